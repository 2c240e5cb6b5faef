"""The operator against a real kube-apiserver (+ etcd) and a real nats-server.

1. N workloads (pinned store paths, so no build is involved) created at once: time from the
   first create until every Deployment exists, and the operator's API requests per workload.
   Baseline, same run and server, same concurrency: a client that creates the N workloads
   and server-side-applies a Deployment for each itself (no operator: the floor of two
   requests per workload). A second baseline shows the floor of the operator's own job: the
   same client making every write the operator makes for a new workload (finalizer,
   Deployment, Event, status: four requests, which the operator makes with no read at all,
   taking workloads and Deployments from its watches), plus the one write per namespace, the
   pods' shared /etc ConfigMap with the CA bundle.
2. `build.done` -> Deployment updated: M workloads following a repository; one build.done at
   a time, latency until that workload's Deployment runs the new store path (p50/p99).
   Baseline: a direct server-side apply of a changed Deployment (one API round trip).

Also the CPU seconds each side cost (this process and the API server, etcd and nats-server it
started): the work itself, which a busy machine does not blur as it blurs wall time.

Targets: all N Deployments within 2x the direct baseline's time; <= 8 API requests per
workload (2x the floor); build.done -> Deployment p99 under 1 s.

Run: .venv/bin/python bench/bench_operator.py [--workloads 200] [--builds 40] [--rounds 3]
(needs the cached kube-apiserver: scripts/setup-kube-apiserver.sh)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kubernetes_asyncio.client import ApiClient  # noqa: E402
from prometheus_client import REGISTRY  # noqa: E402

from bench.report import Report, add_json_option  # noqa: E402
from niphas_common.bus.bus import Bus  # noqa: E402
from niphas_common.kube.client import Kube  # noqa: E402
from niphas_common.nats_server import EmbeddedNats  # noqa: E402
from niphas_common.settings import NatsSettings  # noqa: E402
from niphas_operator import children  # noqa: E402
from niphas_operator.app import run  # noqa: E402
from niphas_operator.children import PodSettings  # noqa: E402
from niphas_operator.settings import OperatorSettings  # noqa: E402
from niphas_operator.workload import Workload, program_of  # noqa: E402
from tests.kube_harness import running_apiserver  # noqa: E402
from tests.niphas_operator.conftest import (  # noqa: E402
    CRD_DIR,
    build_done,
    commit_of,
    store_path,
    workload,
)


def _cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of this process (operator and clients) and of each child it started
    (kube-apiserver, etcd, nats-server), by name: the work a phase costs, whatever else the
    machine runs meanwhile."""
    times = os.times()
    by_name = {"python": times.user + times.system}
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            name, _, rest = stat.read_text().partition(" (")[2].rpartition(")")
        except OSError:
            continue
        fields = rest.split()
        if int(fields[1]) == os.getpid():  # the parent's pid
            by_name[name] = by_name.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return by_name


def _cpu_since(before: dict[str, float]) -> dict[str, float]:
    return {name: s - before.get(name, 0.0) for name, s in _cpu_seconds().items()}


def _api_requests() -> dict[str, float]:
    by_verb: dict[str, float] = {}
    for metric in REGISTRY.collect():
        if metric.name == "niphas_operator_api_requests":
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    by_verb[sample.labels["verb"]] = sample.value
    return by_verb


async def _create_namespace(client: ApiClient, name: str) -> None:
    await Kube(client, "bench").request(
        "POST", "/api/v1/namespaces", body={"metadata": {"name": name}}
    )


async def _until_deployments(kube: Kube, namespace: str, n: int, since: str) -> None:
    """Until `n` Deployments exist in `namespace`, from a watch (listing 200 Deployments
    every few milliseconds would cost the API server more than the operator does)."""
    path = f"/apis/apps/v1/namespaces/{namespace}/deployments"
    seen: set[str] = set()
    while len(seen) < n:
        async for kind, obj in kube.watch(path, since, timeout_s=60):
            if kind == "ADDED":
                seen.add(obj["metadata"]["name"])
                if len(seen) >= n:
                    return
            since = obj["metadata"].get("resourceVersion", since)


async def _bounded(n: int, concurrency: int, make: Any) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await make(i)

    await asyncio.gather(*(one(i) for i in range(n)))


async def direct_apply(
    client: ApiClient, namespace: str, n: int, pod: PodSettings | None = None
) -> float:
    """Seconds for a client to create `n` workloads and apply a Deployment for each. With
    `pod` (the operator's pod settings), every write the operator makes for new workloads
    instead, with the operator's own manifests, and nothing else (no reads, no watches): the
    namespace's shared /etc ConfigMap once, then per workload the finalizer, the Deployment,
    an Event and the status, each after the one before as the operator does."""
    kube = Kube(client, "bench-direct", compressed=False)
    start = time.perf_counter()
    if pod is not None:
        await kube.apply(children.etc_config_map(namespace, pod))

    async def apply(i: int) -> None:
        body = workload(f"w{i}", storePath=store_path(f"w{i}-1.0"))
        path = f"/apis/niphas.io/v1alpha1/namespaces/{namespace}/niphasworkloads"
        created = await kube.request("POST", path, body=body)
        if pod is None:
            await kube.apply(_deployment(namespace, f"d{i}"))
        else:
            version = created["metadata"]["resourceVersion"]
            patch = {"metadata": {"finalizers": ["niphas.io/bench"], "resourceVersion": version}}
            patched = await kube.merge_patch(f"{path}/w{i}", patch)
            ours = Workload(patched)
            running = store_path(f"w{i}-1.0")
            command = children.resolved_command(ours, running, program_of(running))
            await kube.apply(children.deployment(ours, running, command, pod))
            await kube.create(f"/api/v1/namespaces/{namespace}/events", _event(created))
            message = f"0 of 1 replicas updated, running {store_path(f'w{i}-1.0')}"
            status = {"phase": "Provisioning", "reason": "RollingOut", "message": message,
                      "observedGeneration": 1}  # fmt: skip
            version = patched["metadata"]["resourceVersion"]
            patch = {"status": status, "metadata": {"resourceVersion": version}}
            await kube.merge_patch(f"{path}/w{i}/status", patch)

    await _bounded(n, 16, apply)
    return time.perf_counter() - start


def _deployment(namespace: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "stub"}]},
            },
        },
    }


def _event(about: dict[str, Any]) -> dict[str, Any]:
    meta = about["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}."},
        "involvedObject": {
            "apiVersion": about["apiVersion"],
            "kind": about["kind"],
            "namespace": meta["namespace"],
            "name": meta["name"],
            "uid": meta["uid"],
        },
        "type": "Normal",
        "reason": "Provisioned",
        "message": "Deployment runs the pinned store path",
        "source": {"component": "bench-direct"},
        "count": 1,
    }


async def main(n: int, builds: int, rounds: int, json_path: Path | None) -> None:
    with tempfile.TemporaryDirectory() as tmp, running_apiserver() as server:
        server.kubectl("apply", "-k", str(CRD_DIR))
        server.kubectl("wait", "--for=condition=Established", "crd/niphasworkloads.niphas.io")
        nats_server = EmbeddedNats(Path(tmp) / "nats")
        nats_server.start()
        try:
            report = await _run(server, nats_server.url, Path(tmp), n, builds, rounds)
            report.write(json_path)
        finally:
            nats_server.stop()


@dataclass(frozen=True)
class Round:
    ours_s: float
    baseline_s: float
    verbs: dict[str, float]
    ours_cpu: dict[str, float]
    """CPU seconds by process name (see `_cpu_seconds`)."""
    baseline_cpu: dict[str, float]
    same_s: float
    """The direct client making every write the operator makes (see `direct_apply`)."""
    same_cpu: dict[str, float]

    @property
    def ours_cpu_s(self) -> float:
        return sum(self.ours_cpu.values())

    @property
    def baseline_cpu_s(self) -> float:
        return sum(self.baseline_cpu.values())


CA_BUNDLE: list[Path | None] = []
"""--ca-bundle: the operator's NIPHAS_OPERATOR_CA_BUNDLE_FILE in this run (unset: its default)."""


def _settings() -> OperatorSettings:
    default = OperatorSettings()
    return default.model_copy(update={"ca_bundle_file": CA_BUNDLE[0]}) if CA_BUNDLE else default


async def _create_round(
    server: Any, client: ApiClient, nats: NatsSettings, tmp: Path, n: int, r: int
) -> Round:
    """One round: the direct baseline, then the operator, each in fresh namespaces."""
    kube = Kube(client, "bench")
    direct, same, namespace = f"bench-direct-{r}", f"bench-same-{r}", f"bench-create-{r}"
    for ns in (direct, same, namespace):
        await _create_namespace(client, ns)
    cpu = _cpu_seconds()
    baseline_s = await direct_apply(client, direct, n)
    baseline_cpu = _cpu_since(cpu)
    cpu = _cpu_seconds()
    same_s = await direct_apply(client, same, n, _settings().pod())
    same_cpu = _cpu_since(cpu)
    settings = OperatorSettings(
        kubeconfig=server.kubeconfig,
        namespace=namespace,
        lease_namespace=namespace,
        state_dir=tmp / f"state-{r}",
        workers=16,
        ca_bundle_file=_settings().ca_bundle_file,
        renew_period_s=1.0,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, nats, stop))
    await asyncio.sleep(2)  # leader elected, watches established
    _, since = await kube.list(f"/apis/apps/v1/namespaces/{namespace}/deployments")
    deployed = asyncio.create_task(_until_deployments(kube, namespace, n, since))
    before = _api_requests()
    cpu = _cpu_seconds()
    start = time.perf_counter()

    async def create(i: int) -> None:
        body = workload(f"w{i}", storePath=store_path(f"w{i}-1.0"))
        path = f"/apis/niphas.io/v1alpha1/namespaces/{namespace}/niphasworkloads"
        await client.call_api(
            path,
            "POST",
            body=body,
            header_params={"Content-Type": "application/json", "Accept": "application/json"},
            auth_settings=["BearerToken"],
            response_types_map={201: "object"},
        )

    await _bounded(n, 16, create)
    await deployed
    ours_s = time.perf_counter() - start
    ours_cpu = _cpu_since(cpu)
    await asyncio.sleep(3)  # let follow-up reconciles (status, readiness) settle
    after = _api_requests()
    verbs = {verb: (count - before.get(verb, 0)) / n for verb, count in after.items()}
    stop.set()
    await task
    return Round(ours_s, baseline_s, verbs, ours_cpu, baseline_cpu, same_s, same_cpu)


async def _run(server: Any, nats_url: str, tmp: Path, n: int, builds: int, rounds: int) -> Report:
    nats = NatsSettings(url=nats_url)
    bus = await Bus.connect(nats, name="bench")
    async with server.api_client() as client:
        # A fresh API server is still settling (its caches, the CRD's first writes): warm it
        # up so the first round's baseline does not pay for that.
        await _create_namespace(client, "bench-warm-up")
        await direct_apply(client, "bench-warm-up", min(n, 50), _settings().pod())
        results = [await _create_round(server, client, nats, tmp, n, r) for r in range(rounds)]
        await _create_namespace(client, "bench-builds")
        latencies, floor = await _build_latency(
            server, client, Kube(client, "bench"), bus, tmp, nats, builds
        )
    await bus.close()
    ours_s = statistics.median(r.ours_s for r in results)
    baseline_s = statistics.median(r.baseline_s for r in results)
    same_s = statistics.median(r.same_s for r in results)
    ratio = statistics.median(r.ours_s / r.baseline_s for r in results)
    same_ratio = statistics.median(r.ours_s / r.same_s for r in results)
    ours_cpu = statistics.median(r.ours_cpu_s for r in results)
    baseline_cpu = statistics.median(r.baseline_cpu_s for r in results)
    same_cpu = statistics.median(sum(r.same_cpu.values()) for r in results)
    cpu_ratio = statistics.median(r.ours_cpu_s / r.baseline_cpu_s for r in results)
    same_cpu_ratio = statistics.median(r.ours_cpu_s / sum(r.same_cpu.values()) for r in results)
    per_workload = statistics.median(sum(r.verbs.values()) for r in results)
    last = results[-1]

    print(f"kube-apiserver 1.20 + etcd (loopback), {n} workloads; median of {rounds} rounds")
    detail = ", ".join(f"{verb} {count:.2f}" for verb, count in sorted(last.verbs.items()) if count)
    print(f"operator requests per workload by verb (last round): {detail}")
    sides = (("direct", last.baseline_cpu), ("direct, the operator's writes", last.same_cpu),
             ("operator", last.ours_cpu))  # fmt: skip
    for side, cpu in sides:
        split = ", ".join(f"{name} {s:.2f}" for name, s in sorted(cpu.items()) if s >= 0.01)
        print(f"CPU seconds, {side} (last round): {split}")
    print()
    rows = [
        (f"{n} workloads -> all Deployments applied (s)", ours_s, baseline_s, ratio, "<= 2x"),
        ("  CPU seconds (process + API server + etcd)", ours_cpu, baseline_cpu, cpu_ratio, ""),
        ("  vs direct making the operator's writes (s)", ours_s, same_s, same_ratio, ""),
        ("  its CPU seconds", ours_cpu, same_cpu, same_cpu_ratio, ""),
        ("operator API requests per workload", per_workload, 2, per_workload / 2, "<= 8"),
    ]
    p50 = statistics.median(latencies) * 1000
    p99 = statistics.quantiles(latencies, n=100)[98] * 1000 if len(latencies) > 1 else p50
    fl = statistics.median(floor) * 1000
    print(f"| {'measure':<48} | {'ours':>9} | {'baseline':>9} | {'ratio':>6} | target |")
    print(f"|{'-' * 50}|{'-' * 11}|{'-' * 11}|{'-' * 8}|--------|")
    for name, ours, base, r, target in rows:
        print(f"| {name:<48} | {ours:>9.2f} | {base:>9.2f} | {r:>6.2f} | {target:<6} |")
    print(f"| {f'build.done -> Deployment p50 (ms, {builds} builds)':<48} | {p50:>9.1f} | "
          f"{fl:>9.1f} | {p50 / fl:>6.1f} |        |")  # fmt: skip
    print(f"| {f'build.done -> Deployment p99 (ms, {builds} builds)':<48} | {p99:>9.1f} | "
          f"{'':>9} | {'':>6} | < 1000 |")  # fmt: skip
    report = Report("operator", f"Operator: {n} workloads, build.done -> Deployment")
    direct = "a client creating the workloads and applying Deployments itself"
    same = (
        "the same client making every write the operator makes: the namespace's /etc "
        "ConfigMap (the CA bundle) once, then finalizer, Deployment, Event, status"
    )
    report.row(f"{n} workloads -> all Deployments applied", ours_s, "s", baseline=baseline_s,
               baseline_name=direct, ratio=ratio, target="<= 2x", met=ratio <= 2)  # fmt: skip
    report.row(f"{n} workloads: CPU seconds (process + API server + etcd)", ours_cpu, "s",
               baseline=baseline_cpu, baseline_name=direct, ratio=cpu_ratio)  # fmt: skip
    report.row(f"{n} workloads -> all Deployments, vs the operator's writes", ours_s, "s",
               baseline=same_s, baseline_name=same, ratio=same_ratio)  # fmt: skip
    report.row(f"{n} workloads: CPU seconds, vs the operator's writes", ours_cpu, "s",
               baseline=same_cpu, baseline_name=same, ratio=same_cpu_ratio)  # fmt: skip
    report.row("operator API requests per workload", per_workload, "requests", baseline=2,
               baseline_name="the direct client's floor (create + apply)", target="<= 8",
               met=per_workload <= 8)  # fmt: skip
    apply = "one direct server-side apply of a changed Deployment"
    report.row("build.done -> Deployment p50", p50, "ms", baseline=fl, baseline_name=apply)
    report.row("build.done -> Deployment p99", p99, "ms", target="< 1000 ms", met=p99 < 1000)
    report.note(f"kube-apiserver 1.20 + etcd on loopback; median of {rounds} rounds; "
                f"{builds} build.done events one at a time")  # fmt: skip
    bundle = _settings().ca_bundle_file
    size = bundle.stat().st_size if bundle is not None and bundle.is_file() else 0
    report.note(f"pods' CA bundle: {bundle or 'none'} ({size / 1024:.0f} KiB in the "
                "namespace's shared /etc ConfigMap)")  # fmt: skip
    return report


async def _build_latency(
    server: Any, client: ApiClient, kube: Kube, bus: Bus, tmp: Path, nats: NatsSettings, m: int
) -> tuple[list[float], list[float]]:
    namespace = "bench-builds"
    workloads = 10
    for i in range(workloads):
        body = workload(f"b{i}", attribute=f"attr{i}")
        path = f"/apis/niphas.io/v1alpha1/namespaces/{namespace}/niphasworkloads"
        await kube.request("POST", path, body=body)
    settings = OperatorSettings(
        kubeconfig=server.kubeconfig,
        namespace=namespace,
        lease_namespace=namespace,
        state_dir=tmp / "state-builds",
        preheat_nodes=("node-a",),
        renew_period_s=1.0,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, nats, stop))
    latencies: list[float] = []
    floor: list[float] = []
    try:
        await asyncio.sleep(2)
        for k in range(m):
            i = k % workloads
            name = f"b{i}-{k}"
            event = build_done(commit_of(name), name, attribute=f"attr{i}")
            start = time.perf_counter()
            await bus.publish(event)
            await _until_deployed(kube, namespace, f"b{i}", store_path(name))
            latencies.append(time.perf_counter() - start)
            # Floor: one direct server-side apply of a changed Deployment.
            start = time.perf_counter()
            await kube.apply(_floor_deployment(namespace, name))
            floor.append(time.perf_counter() - start)
    finally:
        stop.set()
        await task
    return latencies, floor


async def _until_deployed(kube: Kube, namespace: str, name: str, path: str) -> None:
    """Poll until Deployment `name`'s pod template carries store path `path`."""
    deployment_path = f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}"
    while True:
        deployment = await kube.get(deployment_path)
        annotations = (
            (deployment or {}).get("spec", {}).get("template", {}).get("metadata", {})
        ).get("annotations", {})
        if annotations.get("niphas.io/store-path") == path:
            return
        await asyncio.sleep(0.005)


def _floor_deployment(namespace: str, change: str) -> dict[str, Any]:
    """A Deployment whose pod template differs by `change` on every apply."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "floor", "namespace": namespace},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "floor"}},
            "template": {
                "metadata": {"labels": {"app": "floor"}, "annotations": {"k": change}},
                "spec": {"containers": [{"name": "app", "image": "stub"}]},
            },
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", type=int, default=200)
    parser.add_argument("--builds", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--ca-bundle",
        help="the CA bundle the pods get (the operator's ca_bundle_file; 'none': no CA "
        "ConfigMap content; default: the operator's default, the host's bundle)",
    )
    add_json_option(parser)
    args = parser.parse_args()
    if args.ca_bundle is not None:
        CA_BUNDLE.append(None if args.ca_bundle == "none" else Path(args.ca_bundle))
    asyncio.run(main(args.workloads, args.builds, args.rounds, args.json))
