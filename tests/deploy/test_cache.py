"""The in-cluster binary cache in the rendered manifests: one replica of the mesh in role cache
on a volume behind the Service niphas-cache:8080, its upload token from the Secret
niphas-cache-upload; the builder pushes there with the same token and build pods read it; the
mesh agents fall back to it; only builder, eval workers (uploading evaluated derivations),
mesh agents and build pods reach it. The settings
are read back through the services' own settings classes. The production overlay's
`external-cache` component swaps it for an external store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from niphas_builder.settings import BuilderSettings
from niphas_mesh.settings import MeshSettings
from tests.deploy.test_kustomize import DEPLOY, by_kind, render
from tests.deploy.test_network_policies import (
    BUILD_POD,
    BUILDER,
    CACHE,
    EVAL_WORKER,
    INTERNET,
    MESH,
    NATS,
    OPERATOR,
    allowed,
)

CACHE_URL = "http://niphas-cache:8080"
OVERLAYS = ["base", "overlays/dev", "overlays/production"]


def container(obj: dict[str, Any], name: str) -> dict[str, Any]:
    spec = obj["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == name)


def literal_env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def settings_of(model: type[Any], c: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The container's settings as the service reads them from its environment."""
    for name in list(os.environ):
        if name.startswith("NIPHAS_"):
            monkeypatch.delenv(name)
    for name, value in literal_env(c).items():
        monkeypatch.setenv(name, value)
    return model()


def secret_file(obj: dict[str, Any], c: dict[str, Any], path: Path) -> tuple[str, str, bool]:
    """(Secret name, key, optional) of the Secret volume mounted where `path` lives."""
    mount = next(m for m in c["volumeMounts"] if path.parent == Path(m["mountPath"]))
    volumes = obj["spec"]["template"]["spec"]["volumes"]
    secret = next(v["secret"] for v in volumes if v["name"] == mount["name"])
    return secret["secretName"], path.name, secret.get("optional", False)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_cache_runs_the_mesh_in_role_cache_on_a_volume(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = render(overlay)
    cache = by_kind(objects, "StatefulSet", "niphas-cache")
    assert cache["spec"]["replicas"] == 1
    c = container(cache, "cache")
    assert c["args"] == ["mesh"]
    settings = settings_of(MeshSettings, c, monkeypatch)
    assert settings.role == "cache"
    assert settings.listen.endswith(":8080")
    [claim] = cache["spec"]["volumeClaimTemplates"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    assert settings.cache_dir == Path(mount["mountPath"])
    assert secret_file(cache, c, settings.upload_token_file) == (
        "niphas-cache-upload",
        "token",
        True,  # missing: the pod starts and says so (503, /readyz) instead of hanging
    )
    keys = next(e for e in c["env"] if e["name"] == "NIPHAS_MESH_TRUSTED_PUBLIC_KEYS")
    assert keys["valueFrom"]["configMapKeyRef"]["name"] == "niphas-cache"
    service = by_kind(objects, "Service", "niphas-cache")
    assert service["spec"]["selector"] == cache["spec"]["selector"]["matchLabels"]
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(8080, "http")]
    assert cache["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builder_pushes_to_it_and_mesh_agents_fall_back_to_it(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = render(overlay)
    builder_obj = by_kind(objects, "Deployment", "niphas-builder")
    builder = container(builder_obj, "builder")
    settings = settings_of(BuilderSettings, builder, monkeypatch)
    assert settings.push_url == settings.read_url == CACHE_URL
    assert settings.cache_token_file is not None
    name, key, _ = secret_file(builder_obj, builder, settings.cache_token_file)
    assert (name, key) == ("niphas-cache-upload", "token")
    mesh_obj = by_kind(objects, "DaemonSet", "niphas-mesh")
    mesh = settings_of(MeshSettings, container(mesh_obj, "mesh"), monkeypatch)
    assert CACHE_URL in mesh.fallback_caches.split()
    assert mesh.role == "node"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_builder_eval_workers_mesh_agents_and_build_pods_reach_the_cache(
    overlay: str,
) -> None:
    """Eval workers upload the derivations they evaluated (with the upload token)."""
    rules = [o for o in render(overlay) if o["kind"] == "NetworkPolicy"]
    for reader in (BUILDER, EVAL_WORKER, MESH, BUILD_POD):
        assert allowed(rules, reader, CACHE, 8080), reader.labels
    for other in (OPERATOR, NATS):
        assert not allowed(rules, other, CACHE, 8080), other.labels
    for client in (BUILD_POD, EVAL_WORKER):
        assert not allowed(rules, client, CACHE, 9090), client.labels


def test_production_can_use_an_external_store_instead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    production = DEPLOY / "overlays" / "production"
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{os.path.relpath(production, tmp_path)}]\n"
        f"components: [{os.path.relpath(production / 'external-cache', tmp_path)}]\n"
    )
    objects = render(str(tmp_path))
    assert not [o for o in objects if o["metadata"]["name"] == "niphas-cache"]
    builder_obj = by_kind(objects, "Deployment", "niphas-builder")
    settings = settings_of(BuilderSettings, container(builder_obj, "builder"), monkeypatch)
    assert settings.push_url.startswith("s3://")
    assert settings.read_url.startswith("https://")
    mesh_obj = by_kind(objects, "DaemonSet", "niphas-mesh")
    mesh = settings_of(MeshSettings, container(mesh_obj, "mesh"), monkeypatch)
    assert mesh.fallback_caches == settings.read_url
    rules = [o for o in objects if o["kind"] == "NetworkPolicy"]
    assert allowed(rules, BUILD_POD, INTERNET, 443)
    assert not allowed(rules, BUILD_POD, INTERNET, 80)
    # The production overlay itself keeps the in-cluster cache, on a larger volume.
    cache = by_kind(render("overlays/production"), "StatefulSet", "niphas-cache")
    claim = cache["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]
    assert claim["storage"] == "100Gi"
