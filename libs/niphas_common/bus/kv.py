"""Key-value buckets: current state that others must find later (build claims, evaluation
results, the newest commit of a ref), in last-value form with a per-bucket age limit.

`open_bucket` is the one way to get a bucket: it opens it, or creates it when missing (a
concurrent creator with the same configuration wins harmlessly). Services use the bucket
through `KeyValue` and catch the errors named here, never `nats` itself (import-linter keeps
services away from the client library).
"""

from __future__ import annotations

import logging

from nats.errors import Error as BusError
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyNotFoundError as KeyNotFound
from nats.js.errors import KeyWrongLastSequenceError as RevisionMismatch
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

__all__ = ["BusError", "KeyNotFound", "KeyValue", "RevisionMismatch", "open_bucket"]

log = logging.getLogger(__name__)

# `KeyNotFound`: `get` of a key that is absent, deleted, purged or expired.
# `RevisionMismatch`: `create` of a key that exists, or `update(last=...)` after another write.
# `BusError`: anything else the server or connection refused (unreachable, timed out).


async def open_bucket(
    js: JetStreamContext, name: str, *, ttl_s: float, description: str, replicas: int = 1
) -> KeyValue:
    """The bucket `name`; created (one value per key, file storage, entries older than
    `ttl_s` seconds dropped) when missing."""
    try:
        return await js.key_value(name)
    except NotFoundError:
        pass
    config = KeyValueConfig(
        bucket=name,
        description=description,
        history=1,
        ttl=ttl_s,
        storage=StorageType.FILE,
        replicas=replicas,
    )
    try:
        kv = await js.create_key_value(config)
    except BusError as exc:  # created meanwhile by another process with the same config
        log.debug("create bucket %s: %r", name, exc)
        return await js.key_value(name)
    log.info("created key-value bucket %s", name)
    return kv
