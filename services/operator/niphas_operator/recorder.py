"""Kubernetes Events about a workload: what `kubectl describe nw NAME` and `kubectl get events`
show of things the operator decided without changing the workload (such as a late build it
ignored).

Each Event's name is derived from the workload and what it reports, so reporting the same
thing twice (a redelivered message) creates it once. An Event is information only: failing
to record one is logged and never fails the handler that reports it.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Final

from niphas_common.kube.client import Kube, KubeConflict, KubeError, collection_path
from niphas_operator.workload import API_VERSION, KIND, MANAGED_BY, Workload, now_rfc3339

log = logging.getLogger(__name__)

_NAME_MAX: Final = 200
"""Characters of the workload's name kept in an Event's name (a DNS subdomain, at most 253)."""


class Recorder:
    def __init__(self, kube: Kube) -> None:
        self._kube = kube

    async def record(
        self, workload: Workload, reason: str, message: str, *, about: str, warning: bool = False
    ) -> None:
        """A Normal (or Warning) Event on `workload`; `about` names what it reports (one Event
        per value)."""
        digest = hashlib.sha256(f"{workload.uid}\x00{about}".encode()).hexdigest()[:16]
        now = now_rfc3339()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{workload.name[:_NAME_MAX]}.{digest}"},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "namespace": workload.namespace,
                "name": workload.name,
                "uid": workload.uid,
            },
            "type": "Warning" if warning else "Normal",
            "reason": reason,
            "message": message[:1024],
            "source": {"component": MANAGED_BY},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self._kube.create(collection_path("v1", "Event", workload.namespace), event)
        except KubeConflict:
            pass  # already recorded
        except KubeError as exc:
            log.warning("could not record %s on %s/%s: %s", reason, *workload.key, exc)
