"""Fixtures for the operator's tests: the CRD installed on the session's real kube-apiserver,
settings scoping one operator to the test's own namespace, a running operator, and
builders of workload manifests and pipeline events."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from niphas_common.bus.bus import Bus
from niphas_common.bus.inspect import view
from niphas_common.settings import NatsSettings
from niphas_operator.app import run
from niphas_operator.settings import OperatorSettings
from niphas_schemas import BuildDone, BuiltOutput, EvalDone, EvaluatedAttribute
from niphas_schemas.types import NIX32_ALPHABET
from tests.kube_harness import REPO_ROOT, KubeApiServer

CRD_DIR = REPO_ROOT / "deploy" / "kustomize" / "base" / "crd"
REPOSITORY = "file:///srv/git/demo.git"
FLAKE_REF = f"git+{REPOSITORY}"


def nix32(seed: str, length: int) -> str:
    digest = hashlib.sha256(seed.encode()).digest() * 4
    return "".join(NIX32_ALPHABET[b % 32] for b in digest[:length])


def store_path(name: str) -> str:
    return f"/nix/store/{nix32(name, 32)}-{name}"


def commit_of(seed: str) -> str:
    return hashlib.sha1(seed.encode()).hexdigest()


def build_done(
    commit: str,
    name: str,
    *,
    attribute: str = "web",
    repository: str = REPOSITORY,
    failed: bool = False,
    ref: str | None = None,
    pushed_at: datetime | None = None,
) -> BuildDone:
    """What the builder publishes after realising `attribute` at `commit` (pushed to `ref`
    at `pushed_at`)."""
    path = store_path(name)
    dependency = store_path(f"{name}-lib")
    return BuildDone(
        eval_event_id=f"eval-{commit[:8]}",
        repository=repository,
        ref=ref,
        commit=commit,
        pushed_at=pushed_at,
        attribute=attribute,
        drv_path=store_path(f"{name}.drv"),
        status="failed" if failed else "built",
        outputs=()
        if failed
        else (
            BuiltOutput(
                name="out",
                path=path,
                nar_hash=f"sha256:{nix32(path, 52)}",
                nar_size=4096,
                references=(dependency,),
            ),
        ),
        closure=() if failed else (path, dependency),
        cache_url="http://127.0.0.1:1/cache",
        log_tail="error: builder for web failed with exit code 1" if failed else None,
    )


def eval_done(
    commit: str,
    outputs: dict[str, str],
    *,
    attribute: str = "web",
    main_program: str | None = None,
    error: str | None = None,
) -> EvalDone:
    """What an eval worker publishes for `attribute` at `commit`: per system, the store path
    of its output (`outputs`: system -> name of the path); `error` fails every one."""
    attributes = tuple(
        EvaluatedAttribute(
            attribute=attribute,
            attr_path=f"packages.{system}.{attribute}",
            system=system,
            drv_path=None if error else store_path(f"{name}.drv"),
            outputs={} if error else {"out": store_path(name)},
            main_program=None if error else main_program,
            error=error,
        )
        for system, name in outputs.items()
    )
    return EvalDone(
        push_event_id=f"push-{commit[:8]}",
        repository=REPOSITORY,
        commit=commit,
        status="succeeded",
        attributes=attributes,
    )


def workload(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "niphas.io/v1alpha1",
        "kind": "NiphasWorkload",
        "metadata": {"name": name},
        "spec": {"flakeRef": FLAKE_REF, "attribute": "web", **spec},
    }


@pytest.fixture(scope="session")
def crd(kube_apiserver: KubeApiServer) -> KubeApiServer:
    """The server with the NiphasWorkload CRD applied from the kustomize base."""
    kube_apiserver.kubectl("apply", "-k", str(CRD_DIR))
    kube_apiserver.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/niphasworkloads.niphas.io"
    )
    return kube_apiserver


class Kubectl:
    """kubectl in the test's namespace, returning parsed JSON where asked."""

    def __init__(self, server: KubeApiServer, namespace: str) -> None:
        self.server = server
        self.namespace = namespace

    def __call__(self, *args: str, input: str | None = None, check: bool = True) -> str:
        result = self.server.kubectl("-n", self.namespace, *args, input=input, check=check)
        return result.stdout if check else result.stdout + result.stderr

    def apply(self, manifest: dict[str, Any], check: bool = True, *flags: str) -> str:
        return self("apply", *flags, "-f", "-", input=yaml.safe_dump(manifest), check=check)

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        result = self.server.kubectl(
            "-n", self.namespace, "get", kind, name, "-o", "json", check=False
        )
        if result.returncode != 0:
            if "NotFound" in result.stderr:
                return None
            raise AssertionError(result.stderr)
        loaded: dict[str, Any] = json.loads(result.stdout)
        return loaded


@pytest.fixture
def kubectl(crd: KubeApiServer, kube_namespace: str) -> Kubectl:
    return Kubectl(crd, kube_namespace)


@pytest.fixture
def operator_settings(crd: KubeApiServer, kube_namespace: str, tmp_path: Path) -> OperatorSettings:
    return OperatorSettings(
        kubeconfig=crd.kubeconfig,
        namespace=kube_namespace,
        lease_namespace=kube_namespace,
        identity="operator-a",
        lease_duration_s=3.0,
        renew_period_s=0.5,
        preheat_nodes=("node-a",),
        retry_base_s=0.1,
        retry_max_s=2.0,
        state_dir=tmp_path / "state",
    )


OperatorRunner = Callable[..., contextlib.AbstractAsyncContextManager[None]]


@pytest.fixture
def running_operator(nats_settings: NatsSettings) -> OperatorRunner:
    """`async with running_operator(settings):` runs one operator in this process."""

    @contextlib.asynccontextmanager
    async def runner(settings: OperatorSettings) -> AsyncIterator[None]:
        stop = asyncio.Event()
        task = asyncio.create_task(run(settings, nats_settings, stop))
        try:
            yield
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)

    return runner


def mark_ready(server: KubeApiServer, namespace: str, name: str, replicas: int) -> None:
    """Write a Deployment's status as its controller would once `replicas` pods are ready
    (no controllers run on the test apiserver)."""
    deployment = server.kubectl("-n", namespace, "get", "deployment", name, "-o", "json").stdout
    generation = json.loads(deployment)["metadata"]["generation"]
    status = {
        "status": {
            "observedGeneration": generation,
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": replicas,
            "availableReplicas": replicas,
        }
    }
    server.kubectl(
        "-n", namespace, "patch", "deployment", name, "--subresource=status", "--type=merge",
        "-p", json.dumps(status),
    )  # fmt: skip


def events_of(kubectl: Kubectl, name: str) -> list[dict[str, Any]]:
    """The Events about workload `name`, oldest first."""
    listing = json.loads(
        kubectl("get", "events", "--field-selector", f"involvedObject.name={name}", "-o", "json")
    )
    items: list[dict[str, Any]] = listing["items"]
    return sorted(items, key=lambda e: (e.get("firstTimestamp") or "", e["metadata"]["name"]))


async def messages(bus: Bus, subject: str) -> list[dict[str, Any]]:
    return [json.loads(m.data) for m in await view(bus.js, subject, last=1000)]


async def stream_totals(bus: Bus) -> dict[str, int]:
    """Messages stored per stream: equal before and after means nothing was published."""
    infos = await bus.js.streams_info()
    return {info.config.name or "": info.state.messages for info in infos}
