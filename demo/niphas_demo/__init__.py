"""The main job end to end on the embedded default: `make demo` (see demo/README.md)."""
