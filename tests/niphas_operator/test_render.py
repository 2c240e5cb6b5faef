"""Render mode (no cluster configured): the operator asks the pipeline for a first build,
then writes the manifests it would apply (Deployment, Service, Ingress, PDB, the pods' /etc
ConfigMap), at the store path a build.done reported, into a directory for GitOps."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import yaml

from niphas_common.bus.bus import Bus
from niphas_common.settings import NatsSettings
from niphas_operator.app import run
from niphas_operator.settings import OperatorSettings
from tests.helpers import eventually
from tests.niphas_operator.conftest import build_done, commit_of, messages, store_path, workload


async def test_render_mode_writes_manifests_after_build_done(
    bus: Bus, nats_settings: NatsSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    workloads, rendered = tmp_path / "workloads", tmp_path / "rendered"
    workloads.mkdir()
    manifest = workload(
        "web",
        replicas=2,
        service={"ports": [{"port": 80}]},
        ingress={"host": "web.example.com", "port": 80},
    )
    manifest["metadata"]["namespace"] = "apps"
    (workloads / "web.yaml").write_text(yaml.safe_dump(manifest))
    settings = OperatorSettings(
        workloads_dir=workloads, render_dir=rendered, state_dir=tmp_path / "state"
    )
    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, nats_settings, stop))
    try:
        pushes: list[object] = []

        async def wait_push() -> None:
            while not pushes:
                pushes.extend(await messages(bus, "push.received"))
                await asyncio.sleep(0.1)

        await asyncio.wait_for(wait_push(), 30)
        await bus.publish(build_done(commit_of("one"), "web-1.0"))
        target = rendered / "apps" / "web" / "deployment.yaml"
        await eventually(target.exists, 30)
        deployment = yaml.safe_load(target.read_text())
        volume = deployment["spec"]["template"]["spec"]["volumes"][0]
        assert volume["csi"]["volumeAttributes"]["storePath"] == store_path("web-1.0")
        assert "ownerReferences" not in deployment["metadata"]
        assert (
            yaml.safe_load((rendered / "apps" / "web" / "pdb.yaml").read_text())["apiVersion"]
            == "policy/v1"
        )
        assert (rendered / "apps" / "web" / "service.yaml").exists()
        # The Ingress routes its host to the Service; the pods' /etc is rendered beside.
        ingress = yaml.safe_load((rendered / "apps" / "web" / "ingress.yaml").read_text())
        (rule,) = ingress["spec"]["rules"]
        assert rule["host"] == "web.example.com"
        assert rule["http"]["paths"][0]["backend"]["service"] == {
            "name": "web",
            "port": {"number": 80},
        }
        # The namespace's one /etc, the ConfigMap the Deployment's pods mount.
        etc = yaml.safe_load((rendered / "apps" / "niphas-etc" / "configmap.yaml").read_text())
        assert "root:x:0:0" in etc["data"]["passwd"]
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["niphas-etc"]["configMap"]["name"] == etc["metadata"]["name"]
        pdb = yaml.safe_load((rendered / "apps" / "web" / "pdb.yaml").read_text())
        assert "unhealthyPodEvictionPolicy" not in pdb["spec"]
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert os.environ.get("KUBECONFIG") is None
