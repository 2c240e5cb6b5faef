"""Full build logs on JetStream: one subject per derivation in the stream `BUILD_LOGS`.

The builder appends a build's output in chunks while it runs (`logs.build.<drv hash>`) and a
last, empty message with the header `Niphas-Log-End: <outcome>`; a new run of the same
derivation first purges the subject, so a log is always one run's. The stream is bounded
(`max_bytes`, `max_age_s`, oldest discarded first), and the builder caps each log, so logs
cannot outgrow what the settings allow. Reading (`read`, `follow`) uses the stream's
message-get API (the next message of a subject from a sequence on): no consumer is created.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from niphas_common.bus import inspect
from niphas_schemas import EvalDone

if TYPE_CHECKING:
    from niphas_common.bus.bus import Bus

STREAM: Final = "BUILD_LOGS"
PREFIX: Final = "logs.build."
END_HEADER: Final = "Niphas-Log-End"
KEY: Final = re.compile(r"^[0-9a-df-np-sv-z]{32}$")
"""A derivation's hash part (nix32), the key of its log."""
PUSH_SCAN: Final = 2000
"""Stored eval.done events searched for a push's derivations."""
CHUNK_MAX: Final = 256 * 1024
"""Bytes of log per message: well under NATS's default max_payload of 1 MiB."""


class UnknownLog(LookupError):
    """No log is kept under that key (never built here, expired, or not a derivation hash)."""


def key_of(drv: str) -> str:
    """The log key of a derivation: its path or its hash part; ValueError for anything else."""
    name = drv.rsplit("/", 1)[-1]
    key = name.split("-", 1)[0] if "-" in name else name
    if not KEY.fullmatch(key):
        raise ValueError(f"{drv!r} is not a derivation (path or hash)")
    return key


@dataclass(frozen=True)
class LogChunk:
    text: str
    end: str | None = None
    """The outcome (built, failed, cancelled, ...) on the last message of a log, else None."""


class BuildLogs:
    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    @classmethod
    async def open(
        cls, js: JetStreamContext, *, max_bytes: int, max_age_s: float, replicas: int = 1
    ) -> BuildLogs:
        """The log stream, created or brought to these limits."""
        config = StreamConfig(
            name=STREAM,
            subjects=[f"{PREFIX}*"],
            description="Full build logs, one subject per derivation",
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            max_bytes=max_bytes,
            max_age=max_age_s,
            max_msg_size=CHUNK_MAX + 4096,
            num_replicas=replicas,
        )
        try:
            await js.stream_info(STREAM)
        except NotFoundError:
            await js.add_stream(config)
        else:
            await js.update_stream(config)
        return cls(js)

    async def start(self, key: str) -> None:
        """Forget the previous run's log of `key`."""
        await self._js.purge_stream(STREAM, subject=PREFIX + key_of(key))

    async def append(self, key: str, data: bytes) -> None:
        subject = PREFIX + key_of(key)
        for at in range(0, len(data), CHUNK_MAX):
            await self._js.publish(subject, data[at : at + CHUNK_MAX], stream=STREAM)

    async def finish(self, key: str, outcome: str) -> None:
        await self._js.publish(
            PREFIX + key_of(key), b"", stream=STREAM, headers={END_HEADER: outcome}
        )

    async def _after(self, key: str, seq: int) -> tuple[int, LogChunk] | None:
        """The first message of `key`'s log at or after `seq`."""
        try:
            msg = await self._js.get_msg(STREAM, seq=seq, subject=PREFIX + key, next=True)
        except NotFoundError:
            return None
        end = (msg.headers or {}).get(END_HEADER)
        return msg.seq or seq, LogChunk((msg.data or b"").decode(errors="replace"), end)

    async def chunks(self, key: str) -> AsyncIterator[LogChunk]:
        """What is stored of `key`'s log now; `UnknownLog` when nothing is."""
        key = _checked(key)
        seq, found = 1, False
        while (step := await self._after(key, seq)) is not None:
            found = True
            seq = step[0] + 1
            yield step[1]
        if not found:
            raise UnknownLog(key)

    async def read(self, key: str) -> tuple[str, str | None]:
        """(the stored text, the outcome once the build ended else None)."""
        parts, end = [], None
        async for chunk in self.chunks(key):
            parts.append(chunk.text)
            end = chunk.end or end
        return "".join(parts), end

    async def builds_of_push(self, push: str, last: int = PUSH_SCAN) -> list[tuple[str, str]]:
        """(attribute, log key) of each derivation evaluated for `push` (a push's event id,
        or a commit), from the last `last` stored eval.done events; `UnknownLog` if none."""
        try:
            stored = await inspect.view(self._js, EvalDone.subject, last=last)
        except LookupError:
            stored = []
        found: dict[str, str] = {}
        for msg in stored:
            try:
                done = EvalDone.model_validate_json(msg.data)
            except ValueError:
                continue
            if push not in (done.push_event_id, done.commit):
                continue
            for attr in done.attributes:
                if attr.drv_path is not None:
                    found[attr.attribute] = key_of(attr.drv_path)
        if not found:
            raise UnknownLog(push)
        return sorted(found.items())

    async def follow(
        self, key: str, *, poll_s: float = 0.5, wait_s: float = 0.0
    ) -> AsyncIterator[LogChunk]:
        """`key`'s log from its start until its end message, waiting for more while the
        build runs. `wait_s`: how long to wait for a log that has not started."""
        key = _checked(key)
        seq, found = 1, False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            step = await self._after(key, seq)
            if step is None:
                if not found and loop.time() >= deadline:
                    raise UnknownLog(key)
                await asyncio.sleep(poll_s)
                continue
            found = True
            seq = step[0] + 1
            yield step[1]
            if step[1].end is not None:
                return


async def build_logs(bus: Bus, *, max_bytes: int, max_age_s: float) -> BuildLogs:
    """The log stream of `bus`'s server (for services, which never touch `bus.js`)."""
    return await BuildLogs.open(
        bus.js, max_bytes=max_bytes, max_age_s=max_age_s, replicas=bus.settings.replicas
    )


def log_reader(bus: Bus) -> BuildLogs:
    """Reading the logs the builder keeps (the stream is the builder's to configure)."""
    return BuildLogs(bus.js)


def _checked(key: str) -> str:
    try:
        return key_of(key)
    except ValueError:
        raise UnknownLog(key) from None
