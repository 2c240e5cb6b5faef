"""Every rendered overlay (base, dev, node, production) holds what a cluster operator expects
of each pod: Pod Security labels on the namespace (enforce privileged for the csi/mesh
DaemonSets and build pods, warn and audit stricter), CPU and memory requests and a memory
limit on every container, and readiness and liveness probes on the port and path where the
service really answers them (the ServiceRuntime's /readyz and /healthz on its ops or HTTP
port; NATS's own /healthz). References to Secrets a service can explain the absence of are
optional, so the pod starts and says what is missing instead of CreateContainerConfigError."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.test_kustomize import render

OVERLAYS = ["base", "overlays/dev", "overlays/node", "overlays/production"]
POD_KINDS = {"Deployment", "DaemonSet", "StatefulSet"}
LEVELS = ["privileged", "baseline", "restricted"]


def containers(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for obj in objects:
        if obj["kind"] not in POD_KINDS:
            continue
        spec = obj["spec"]["template"]["spec"]
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            found.append((f"{obj['metadata']['name']}/{c['name']}", c))
    return found


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(request.param)


def test_namespace_enforces_privileged_and_warns_and_audits_stricter(
    rendered: list[dict[str, Any]],
) -> None:
    (namespace,) = [o for o in rendered if o["kind"] == "Namespace"]
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    warn = labels["pod-security.kubernetes.io/warn"]
    audit = labels["pod-security.kubernetes.io/audit"]
    assert LEVELS.index(warn) > 0 and LEVELS.index(audit) >= LEVELS.index(warn)
    for mode in ("enforce", "warn", "audit"):
        assert labels[f"pod-security.kubernetes.io/{mode}-version"] == "latest"


def test_every_container_has_requests_and_a_memory_limit(rendered: list[dict[str, Any]]) -> None:
    listed = containers(rendered)
    assert len(listed) >= 8
    for name, c in listed:
        resources = c.get("resources", {})
        assert {"cpu", "memory"} <= set(resources.get("requests", {})), name
        assert "memory" in resources.get("limits", {}), name


def _port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return int(next(p["containerPort"] for p in container["ports"] if p["name"] == port))


def _ops_ports(container: dict[str, Any]) -> set[int]:
    """Where the service answers /healthz and /readyz: its metrics port (the ops server) and
    its own HTTP app (LISTEN), as its environment configures them."""
    ports: set[int] = set()
    for e in container.get("env", []):
        if "value" not in e:
            continue
        if e["name"].endswith("_METRICS_PORT"):
            ports.add(int(e["value"]))
        elif e["name"] in {"NIPHAS_EVAL_LISTEN", "NIPHAS_MESH_LISTEN"}:
            ports.add(int(e["value"].rpartition(":")[2]))
    return ports


def test_probes_ask_the_service_where_it_answers(rendered: list[dict[str, Any]]) -> None:
    for name, c in containers(rendered):
        ready, live = c["readinessProbe"]["httpGet"], c["livenessProbe"]["httpGet"]
        if name == "nats/nats":
            assert ready["path"] == live["path"] == "/healthz?js-enabled-only=true"
            assert _port_number(c, ready["port"]) == _port_number(c, live["port"]) == 8222
            continue
        assert ready["path"] == "/readyz", name
        assert live["path"] == "/healthz", name
        ops = _ops_ports(c)
        assert ops, name
        assert _port_number(c, ready["port"]) in ops, name
        assert _port_number(c, live["port"]) in ops, name
        # The ops server of a service that has only that one binds every address.
        env = {e["name"]: e.get("value") for e in c["env"]}
        for key, value in env.items():
            if key.endswith("_METRICS_HOST"):
                assert value == "0.0.0.0", name


def test_secrets_a_service_explains_are_optional(rendered: list[dict[str, Any]]) -> None:
    """Every Niphas container (not the NATS server, which cannot explain itself: kubelet names
    the Secret in CreateContainerConfigError) starts without its Secrets."""
    for name, c in containers(rendered):
        if name == "nats/nats":
            continue
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref is not None:
                assert ref.get("optional") is True, (name, e["name"])
    for obj in rendered:
        if obj["kind"] not in POD_KINDS or obj["metadata"]["name"] == "nats":
            continue
        for volume in obj["spec"]["template"]["spec"].get("volumes", []):
            if "secret" in volume:
                assert volume["secret"].get("optional") is True, volume["name"]
