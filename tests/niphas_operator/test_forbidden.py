"""A NiphasWorkload whose children the operator may not write in its namespace: the real
kube-apiserver answers 403 Forbidden, the workload gets `Ready=False, reason=Forbidden` with the
server's sentence and a Warning Event, the operator retries with backoff (no crash), and once
the permission is there the children are applied and the condition goes.

The test apiserver authorizes everything (AlwaysAllow), so the 403 comes from admission: a
ResourceQuota allowing no Deployment in the namespace makes the server answer a Deployment's
creation exactly as RBAC would (HTTP 403, a Status with reason Forbidden); the operator sees
the same answer either way, and deleting the quota stands for granting the permission."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from niphas_operator.settings import OperatorSettings
from tests.helpers import eventually
from tests.niphas_operator.conftest import Kubectl, OperatorRunner, store_path, workload


def _condition(kubectl: Kubectl, name: str, type_: str) -> dict[str, Any] | None:
    obj = kubectl.get("nw", name) or {}
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == type_), None)


async def test_a_forbidden_namespace_is_a_condition_and_an_event(
    kubectl: Kubectl,
    operator_settings: OperatorSettings,
    running_operator: OperatorRunner,
    caplog: pytest.LogCaptureFixture,
) -> None:
    kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": {"name": "no-deployments"},
            "spec": {"hard": {"count/deployments.apps": "0"}},
        }
    )
    # No controller manager computes the quota's usage here: give it the status it would.
    quota = kubectl.get("resourcequota", "no-deployments") or {}
    quota["status"] = {
        "hard": {"count/deployments.apps": "0"},
        "used": {"count/deployments.apps": "0"},
    }
    kubectl(
        "replace", "--raw",
        f"/api/v1/namespaces/{kubectl.namespace}/resourcequotas/no-deployments/status",
        "-f", "-", input=json.dumps(quota),
    )  # fmt: skip
    kubectl.apply(workload("web", storePath=store_path("web-1.0")))
    async with running_operator(operator_settings):
        await eventually(lambda: _condition(kubectl, "web", "Ready") is not None, 30)
        condition = _condition(kubectl, "web", "Ready")
        assert condition is not None
        assert (condition["status"], condition["reason"]) == ("False", "Forbidden")
        assert condition["message"].startswith(
            f"the operator may not create or change the Deployment, Service and "
            f"PodDisruptionBudget of this workload in namespace {kubectl.namespace}: "
        )
        assert "exceeded quota: no-deployments" in condition["message"]
        assert (kubectl.get("nw", "web") or {})["status"]["phase"] == "Degraded"
        assert kubectl.get("deployment", "web") is None
        events = kubectl("get", "events", "-o", "json", "--field-selector=reason=Forbidden")
        assert '"type": "Warning"' in events and "exceeded quota" in events
        # Retried with backoff, logged as a warning: no traceback.
        await eventually(
            lambda: sum("Forbidden" in r.getMessage() for r in caplog.records) >= 2, 30
        )
        assert not any(r.exc_info for r in caplog.records if r.name.startswith("niphas"))
        assert all(r.levelno < logging.ERROR for r in caplog.records if "403" in r.getMessage())

        kubectl("delete", "resourcequota", "no-deployments")  # the permission is granted
        await eventually(lambda: kubectl.get("deployment", "web") is not None, 30)
        await eventually(lambda: _condition(kubectl, "web", "Ready") is None, 30)
