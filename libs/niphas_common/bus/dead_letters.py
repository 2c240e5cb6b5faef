"""Recording poison messages where an operator can find them.

A message no handler can use is copied, body untouched, to `dead.<subject>` in the
`DEAD_LETTERS` stream with headers saying why, from which stream and sequence, and after how
many deliveries; only then is the original terminated, so nothing disappears silently.
`niphas events view 'dead.>'` lists them.
"""

from __future__ import annotations

from collections.abc import Mapping

from nats.js import JetStreamContext

from niphas_common.bus.codec import HEADER_MSG_ID
from niphas_common.bus.topology import DEAD_LETTER_STREAM, dead_letter_subject

HEADER_REASON = "Niphas-Dead-Reason"
HEADER_STREAM = "Niphas-Dead-Stream"
HEADER_SEQUENCE = "Niphas-Dead-Sequence"
HEADER_DELIVERIES = "Niphas-Dead-Deliveries"
HEADER_CONSUMER = "Niphas-Dead-Consumer"
HEADER_ORIGINAL_MSG_ID = "Niphas-Dead-Msg-Id"

MAX_REASON = 1024


async def record_dead_letter(
    js: JetStreamContext,
    *,
    subject: str,
    data: bytes,
    headers: Mapping[str, str] | None,
    reason: str,
    stream: str,
    sequence: int,
    deliveries: int,
    consumer: str,
) -> None:
    """Store the copy and wait for the ack; raises when it could not be stored."""
    out = {k: v for k, v in (headers or {}).items() if k != HEADER_MSG_ID}
    if headers and HEADER_MSG_ID in headers:
        out[HEADER_ORIGINAL_MSG_ID] = headers[HEADER_MSG_ID]
    # Header values are single lines.
    out[HEADER_REASON] = " ".join(reason.split())[:MAX_REASON]
    out[HEADER_STREAM] = stream
    out[HEADER_SEQUENCE] = str(sequence)
    out[HEADER_DELIVERIES] = str(deliveries)
    out[HEADER_CONSUMER] = consumer
    # One record per consumer and original message, however often this is retried.
    out[HEADER_MSG_ID] = f"dead:{consumer}:{stream}:{sequence}"
    await js.publish(
        dead_letter_subject(subject), data, stream=DEAD_LETTER_STREAM, headers=out, timeout=5.0
    )
