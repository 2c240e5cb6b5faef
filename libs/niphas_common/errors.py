"""What a handler raises, translated once at the edge (the consumer turns these into NATS
nak-with-delay or term; HTTP and gRPC edges map them to their own status codes)."""

from __future__ import annotations


class NiphasError(Exception):
    """Base of every error Niphas raises on purpose."""


class TransientError(NiphasError):
    """Worth retrying later: a peer or the cache is down, a lease is held, a timeout."""


class PermanentError(NiphasError):
    """Retrying cannot help: the event is recorded as dead and never redelivered."""


class PoisonMessage(PermanentError):
    """The message itself is unusable: not JSON, not the model, an unknown schema version."""
