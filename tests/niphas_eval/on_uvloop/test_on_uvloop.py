"""The eval service's tests that lean on the event loop, again on uvloop, as `niphas eval`
runs (NIPHAS_EVAL_EVENT_LOOP): a push accepted, refusals, a body already received and one
that trickles or stalls (read timeout), a flood with health checks, a bus that stops or
never acknowledges (publish timeouts); workers evaluating under prlimit, killed at their
timeout or memory bound."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from tests.niphas_eval.test_ingress import (
    test_an_ack_that_never_comes_answers_503_after_the_shorter_timeout,
    test_bus_stopped_answers_503_quickly_and_not_ready,
    test_github_push_becomes_one_push_received,
    test_refused_requests_publish_nothing,
)
from tests.niphas_eval.test_ingress_clients import (
    big_ingress,
    test_health_and_deliveries_are_answered_during_a_flood,
    test_stalled_and_trickling_clients_are_cut_off,
)
from tests.niphas_eval.test_worker import (
    test_memory_bound_gives_one_failed_eval_done,
    test_timeout_gives_one_failed_eval_done,
    test_two_quick_pushes_are_each_evaluated_at_their_own_commit,
)

pytestmark = pytest.mark.nix

__all__ = [
    "big_ingress",
    "test_an_ack_that_never_comes_answers_503_after_the_shorter_timeout",
    "test_bus_stopped_answers_503_quickly_and_not_ready",
    "test_github_push_becomes_one_push_received",
    "test_health_and_deliveries_are_answered_during_a_flood",
    "test_memory_bound_gives_one_failed_eval_done",
    "test_refused_requests_publish_nothing",
    "test_stalled_and_trickling_clients_are_cut_off",
    "test_timeout_gives_one_failed_eval_done",
    "test_two_quick_pushes_are_each_evaluated_at_their_own_commit",
]


async def test_the_tests_here_run_on_uvloop() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
