"""Logging set-up: readable text or one JSON object per line, always with the event id.

The event being handled lives in a context variable set by the consumer, so every log line
written while handling it carries `event_id` (and the trace id) without passing it around.

One record is one line: in text, the message's line breaks and other control characters are
written as escapes (`\\n`, `\\x1b`), so a string from a client or a pushed repository can
never forge a line, and a multi-line command stays whole; only a traceback follows on its
own lines. JSON escapes them by itself.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from datetime import UTC, datetime

from opentelemetry import trace

current_event_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "niphas_event_id", default=None
)


_BREAKS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")

_JSON_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def one_line(text: str) -> str:
    """`text` with line breaks and control characters (but tabs) as Python escapes."""
    return _BREAKS.sub(lambda m: repr(m.group())[1:-1], text)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.event_id = current_event_id.get()
        ctx = trace.get_current_span().get_span_context()
        record.trace_id = format(ctx.trace_id, "032x") if ctx.is_valid else None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "event_id": getattr(record, "event_id", None),
            "trace_id": getattr(record, "trace_id", None),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        line = json.dumps(entry, ensure_ascii=False)
        # JSON leaves these raw, but readers (and str.splitlines) break lines at them.
        return line.translate(_JSON_BREAKS)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        event_id = getattr(record, "event_id", None)
        return f"{line} [event={event_id}]" if event_id else line


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Install one stderr handler on the root logger (idempotent)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_niphas", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_ContextFilter())
    handler._niphas = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
