"""Tests of the builder service."""
