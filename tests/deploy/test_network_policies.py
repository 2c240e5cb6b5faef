"""Who may talk to whom, read from the rendered NetworkPolicies with the API's semantics
(a pod selected by any policy of a type is isolated for that type; traffic passes when an
egress rule of the source and an ingress rule of the destination both allow it). Untrusted
code runs in eval workers and build pods: they reach only what they need, never NATS (build
pods), the API server, other services or the internet (unless a component opens it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.deploy.test_kustomize import render

NAMESPACE = "niphas-system"


@dataclass(frozen=True)
class Peer:
    labels: dict[str, str] = field(default_factory=dict)
    namespace_labels: dict[str, str] = field(
        default_factory=lambda: {"kubernetes.io/metadata.name": NAMESPACE}
    )
    ip: str | None = None
    """Set for a peer outside the cluster's pods."""


def pod(name: str, **extra: str) -> Peer:
    return Peer({"app.kubernetes.io/name": name, **extra})


EVAL_WORKER = pod("niphas-eval-worker", **{"app.kubernetes.io/part-of": "niphas"})
BUILD_POD = pod("niphas-build", **{"app.kubernetes.io/managed-by": "niphas-builder"})
BUILDER = pod("niphas-builder", **{"app.kubernetes.io/part-of": "niphas"})
MESH = pod("niphas-mesh", **{"app.kubernetes.io/part-of": "niphas"})
CACHE = pod("niphas-cache", **{"app.kubernetes.io/part-of": "niphas"})
NATS = pod("nats", **{"app.kubernetes.io/part-of": "niphas"})
OPERATOR = pod("niphas-operator", **{"app.kubernetes.io/part-of": "niphas"})
DNS = Peer({"k8s-app": "kube-dns"}, {"kubernetes.io/metadata.name": "kube-system"})
API_SERVER = Peer(ip="10.96.0.1")
INTERNET = Peer(ip="93.184.216.34")
METADATA = Peer(ip="169.254.169.254")


def _matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return True
    wanted = selector.get("matchLabels") or {}
    return all(labels.get(k) == v for k, v in wanted.items())


def _ip_in(block: dict[str, Any], ip: str) -> bool:
    import ipaddress

    address = ipaddress.ip_address(ip)
    if address not in ipaddress.ip_network(block["cidr"]):
        return False
    return not any(address in ipaddress.ip_network(e) for e in block.get("except", []))


def _peer_allowed(rule_peers: list[dict[str, Any]] | None, other: Peer) -> bool:
    if not rule_peers:
        return True  # no `to`/`from`: every peer
    for peer in rule_peers:
        if "ipBlock" in peer:
            if other.ip is not None and _ip_in(peer["ipBlock"], other.ip):
                return True
            continue
        if other.ip is not None:
            continue
        ns_selector = peer.get("namespaceSelector")
        if ns_selector is None:
            in_namespace = other.namespace_labels.get("kubernetes.io/metadata.name") == NAMESPACE
        else:
            in_namespace = _matches(ns_selector, other.namespace_labels)
        if in_namespace and _matches(peer.get("podSelector"), other.labels):
            return True
    return False


def _port_allowed(ports: list[dict[str, Any]] | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    return any(p["port"] == port and p.get("protocol", "TCP") == protocol for p in ports)


def _side_allows(
    policies: list[dict[str, Any]], kind: str, subject: Peer, other: Peer, port: int, proto: str
) -> bool:
    if subject.ip is not None or subject.namespace_labels != Peer().namespace_labels:
        return True  # not a pod of ours: no policy of ours isolates it
    selecting = [
        p
        for p in policies
        if kind in p["spec"].get("policyTypes", ["Ingress"])
        and _matches(p["spec"]["podSelector"], subject.labels)
    ]
    if not selecting:
        return True
    key, peers_key = ("egress", "to") if kind == "Egress" else ("ingress", "from")
    return any(
        _peer_allowed(rule.get(peers_key), other) and _port_allowed(rule.get("ports"), port, proto)
        for policy in selecting
        for rule in policy["spec"].get(key) or []
    )


def allowed(
    policies: list[dict[str, Any]], src: Peer, dst: Peer, port: int, proto: str = "TCP"
) -> bool:
    return _side_allows(policies, "Egress", src, dst, port, proto) and _side_allows(
        policies, "Ingress", dst, src, port, proto
    )


def policies(overlay: str) -> list[dict[str, Any]]:
    return [o for o in render(overlay) if o["kind"] == "NetworkPolicy"]


@pytest.mark.parametrize("overlay", ["base", "overlays/dev", "overlays/production"])
def test_build_pods_reach_only_the_cache_the_staging_endpoint_and_dns(overlay: str) -> None:
    rules = policies(overlay)
    assert allowed(rules, BUILD_POD, BUILDER, 8090)
    assert allowed(rules, BUILD_POD, MESH, 8080)
    assert allowed(rules, BUILD_POD, DNS, 53, "UDP")
    for target, port in [(NATS, 4222), (OPERATOR, 9090), (BUILDER, 9090), (MESH, 9090)]:
        assert not allowed(rules, BUILD_POD, target, port), (target.labels, port)
    for outside in (API_SERVER, METADATA):
        assert not allowed(rules, BUILD_POD, outside, 443)
        assert not allowed(rules, BUILD_POD, outside, 80)
    assert not allowed(rules, BUILD_POD, INTERNET, 80)
    # The internet over HTTPS only where a component declares forges (production).
    assert allowed(rules, BUILD_POD, INTERNET, 443) == (overlay == "overlays/production")


@pytest.mark.parametrize("overlay", ["base", "overlays/dev", "overlays/production"])
def test_eval_workers_reach_nats_dns_and_the_cache_but_no_other_platform_service(
    overlay: str,
) -> None:
    rules = policies(overlay)
    assert allowed(rules, EVAL_WORKER, NATS, 4222)
    assert allowed(rules, EVAL_WORKER, DNS, 53, "UDP")
    assert allowed(rules, EVAL_WORKER, CACHE, 8080)  # uploads of evaluated derivations
    for target, port in [(BUILDER, 8090), (MESH, 8080), (OPERATOR, 9090), (CACHE, 9090)]:
        assert not allowed(rules, EVAL_WORKER, target, port)
    assert not allowed(rules, EVAL_WORKER, API_SERVER, 443)
    assert not allowed(rules, EVAL_WORKER, METADATA, 80)


def test_forges_only_where_the_component_declares_them() -> None:
    assert not allowed(policies("overlays/dev"), EVAL_WORKER, INTERNET, 443)
    production = policies("overlays/production")
    assert allowed(production, EVAL_WORKER, INTERNET, 443)
    assert allowed(production, EVAL_WORKER, INTERNET, 22)
    assert not allowed(production, EVAL_WORKER, INTERNET, 80)
    assert not allowed(production, EVAL_WORKER, METADATA, 443)
    # Build pods fetch a flake whose .drv the cache lacks from the same forges.
    assert allowed(production, BUILD_POD, INTERNET, 443)
    assert not allowed(production, BUILD_POD, INTERNET, 80)
    assert not allowed(production, BUILD_POD, METADATA, 443)
