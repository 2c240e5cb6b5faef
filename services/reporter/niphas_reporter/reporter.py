"""The reporter's handlers: push.received, eval.done, build.done and workload.status ->
commit statuses.

A consumer of the existing subjects beside the pipeline (its own durables): the services
stay unaware of forges beyond eval's webhooks. Each handler only turns the event into
statuses and queues them (`StatusPoster`), so its event is acked at once, whatever the
forge does.
"""

from __future__ import annotations

from typing import Any

from niphas_common.bus.consumer import Delivery, Subscription
from niphas_common.bus.topology import ConsumerSpec
from niphas_schemas import BuildDone, EvalDone, PushReceived, WorkloadRolled

from .poster import StatusPoster
from .statuses import Statuses


class Reporter:
    def __init__(self, statuses: Statuses, poster: StatusPoster, durable_prefix: str) -> None:
        self.statuses = statuses
        self.poster = poster
        self.durable_prefix = durable_prefix

    def subscriptions(self) -> list[Subscription[Any]]:
        def spec(suffix: str, subject: str) -> ConsumerSpec:
            return ConsumerSpec(
                durable=f"{self.durable_prefix}-{suffix}",
                subject=subject,
                backoff_s=(1.0, 5.0, 30.0),
            )

        return [
            Subscription(PushReceived, spec("push", PushReceived.subject), self.on_push),
            Subscription(EvalDone, spec("eval", EvalDone.subject), self.on_eval),
            Subscription(BuildDone, spec("build", BuildDone.subject), self.on_build),
            Subscription(WorkloadRolled, spec("deploy", WorkloadRolled.subject), self.on_rollout),
        ]

    async def on_push(self, event: PushReceived, _: Delivery) -> None:
        self.poster.learn_forge(event.repository, event.forge)
        for status in self.statuses.for_push(event):
            self.poster.submit(status)

    async def on_eval(self, event: EvalDone, _: Delivery) -> None:
        for status in self.statuses.for_eval(event):
            self.poster.submit(status)

    async def on_build(self, event: BuildDone, _: Delivery) -> None:
        for status in self.statuses.for_build(event):
            self.poster.submit(status)

    async def on_rollout(self, event: WorkloadRolled, _: Delivery) -> None:
        for status in self.statuses.for_rollout(event):
            self.poster.submit(status)
