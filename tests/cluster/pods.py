"""Waiting on pods of the real node through kubectl (the tests' view is a user's)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from tests.node_harness import Kubectl


def new_namespace(kubectl: Kubectl) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name)
    # The service-account controller creates `default` shortly after; pods need it.
    deadline = time.monotonic() + 30
    while kubectl("-n", name, "get", "serviceaccount", "default", check=False).returncode:
        if time.monotonic() > deadline:
            raise AssertionError(f"namespace {name} never got its default service account")
        time.sleep(0.2)
    return name


def wait_for(
    kubectl: Kubectl, namespace: str, kind: str, name: str, ready: Any, timeout_s: float = 90
) -> dict[str, Any]:
    """Poll until `ready(obj)` is true; fail with the object's status and its events."""
    deadline = time.monotonic() + timeout_s
    obj: dict[str, Any] = {}
    while time.monotonic() < deadline:
        done = kubectl("-n", namespace, "get", kind, name, "-o", "json", check=False)
        if done.returncode == 0:
            obj = json.loads(done.stdout)
            if ready(obj):
                return obj
        time.sleep(0.3)
    events = kubectl("-n", namespace, "get", "events", "-o", "wide", check=False).stdout
    raise AssertionError(
        f"{kind}/{name} not ready after {timeout_s:.0f} s: {json.dumps(obj.get('status'))}\n"
        f"{events[-3000:]}"
    )
