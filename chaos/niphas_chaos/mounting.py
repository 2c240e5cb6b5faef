"""Mounts throughout the soak: the demo's kubelet stand-in keeps moving the workload's pod onto
the latest store path the operator rendered, over the CSI driver's gRPC socket, while faults
happen.

Each round publishes a volume for the current Deployment, checks the mounted closure (the
program is there, byte for byte the node store's, and every store path it names is in the view),
then unpublishes the previous pod's volume (a rollout: new pod first). A publish that fails must
fail with a CSI error (a gRPC status and a message); the failed volume is unpublished (what
kubelet does when the pod goes) and the publish retried until it succeeds. At the end the last
pod is unpublished and nothing it used may be left (`leaks`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from niphas_demo.kubelet import Kubelet, Pod, PodSpec, read_deployment
from niphas_demo.layout import Layout

STORE_PATH = re.compile(r"/nix/store/([a-z0-9]{32}-[^/\s'\"]+)")
PUBLISH_TIMEOUT_S = 60.0
RETRY_FOR_S = 180.0
"""How long a failed publish or unpublish is retried before the soak reports it unresolved."""
ROUND_PAUSE_S = 1.0


@dataclass(frozen=True)
class Attempt:
    at_s: float
    """Seconds since the soak started (the call's start)."""
    ended_s: float
    call: str
    """`publish` or `unpublish`."""
    store_path: str
    error: str = ""
    """Empty on success; else `<gRPC status>: <message>`."""


@dataclass
class MountRecord:
    attempts: list[Attempt] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """A failure without a clear CSI error, a retry that never resolved, a broken closure."""
    store_paths: list[str] = field(default_factory=list)
    """Each store path published, in order."""


def closure_problem(pod: Pod, node_store: Path) -> str | None:
    """Why the mounted tree is not the closure (None when it is): the program must be in the
    view with the node store's bytes, and every store path it names must be there too."""
    program = pod.spec.command[0]
    mount = pod.spec.mount_path.rstrip("/")
    if not program.startswith(mount + "/"):
        return f"{program} is not below the volume's mountPath {mount}"
    inside = pod.target / program[len(mount) + 1 :]
    try:
        mounted = inside.read_bytes()
    except OSError as exc:
        return f"{program} missing from the published volume: {exc}"
    original = (node_store / program.lstrip("/")).read_bytes()
    if mounted != original:
        return f"{program}: the published bytes differ from the node store's"
    for name in STORE_PATH.findall(mounted.decode(errors="replace")):
        if not (pod.target / name).exists():
            return f"{program} names /nix/store/{name}, absent from the volume"
    return None


def csi_error(exc: Exception) -> str:
    """`<status>: <message>` of a gRPC error; the bare exception otherwise (not clear)."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details() or ''}".strip()
    return repr(exc)


def clear(error: str) -> bool:
    """A CSI error a kubelet can act on: a gRPC status name and a message."""
    status, _, message = error.partition(": ")
    return status.isupper() and bool(message.strip())


class MountLoop:
    def __init__(self, layout: Layout, t0: float) -> None:
        self.layout = layout
        self.record = MountRecord()
        self._t0 = t0
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> MountRecord:
        current: Pod | None = None
        async with Kubelet(self.layout.csi_socket, self.layout.pods, "demo-node") as kubelet:
            while not self._stop.is_set():
                spec = self._rendered()
                if spec is None:
                    await self._pause()
                    continue
                pod = await self._publish(kubelet, spec)
                if pod is not None:
                    if problem := closure_problem(pod, self.layout.node_store):
                        self.record.problems.append(problem)
                    if current is not None:
                        await self._unpublish(kubelet, current)
                    current = pod
                await self._pause()
            if current is not None:
                await self._unpublish(kubelet, current)
        return self.record

    def _rendered(self) -> PodSpec | None:
        try:
            return read_deployment(self.layout.deployment())
        except (OSError, ValueError, KeyError):
            return None  # being replaced: read again next round

    async def _pause(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), ROUND_PAUSE_S)

    def _now(self) -> float:
        return time.monotonic() - self._t0

    async def _publish(self, kubelet: Kubelet, spec: PodSpec) -> Pod | None:
        """Publish until it works (each failed volume unpublished first, as kubelet does when
        it gives up on a pod); None if it never did within `RETRY_FOR_S` or before the soak
        stopped the loop."""
        deadline = self._now() + RETRY_FOR_S
        while True:
            before = set(self.layout.pods.iterdir()) if self.layout.pods.exists() else set()
            started = self._now()
            try:
                pod = await kubelet.publish(spec, timeout_s=PUBLISH_TIMEOUT_S)
            except (grpc.aio.AioRpcError, OSError) as exc:
                error = csi_error(exc)
                self._attempt(started, "publish", spec.store_path, error)
                if not clear(error):
                    self.record.problems.append(f"publish failed without a CSI error: {error}")
                for directory in set(self.layout.pods.iterdir()) - before:
                    failed = Pod(spec, directory.name, kubelet_target(directory))
                    await self._unpublish(kubelet, failed)
                if self._now() > deadline or self._stop.is_set():
                    # The soak is over (or it gave up): an unresolved failure either way.
                    self.record.problems.append(
                        f"publish of {spec.store_path} still failing after"
                        f" {self._now() - deadline + RETRY_FOR_S:.0f}s: {error}"
                    )
                    return None
                await asyncio.sleep(ROUND_PAUSE_S)
                continue
            self._attempt(started, "publish", spec.store_path)
            if spec.store_path not in self.record.store_paths:
                self.record.store_paths.append(spec.store_path)
            return pod

    async def _unpublish(self, kubelet: Kubelet, pod: Pod) -> None:
        deadline = self._now() + RETRY_FOR_S
        while True:
            started = self._now()
            try:
                await kubelet.delete(pod)
            except (grpc.aio.AioRpcError, OSError) as exc:
                error = csi_error(exc)
                self._attempt(started, "unpublish", pod.spec.store_path, error)
                if self._now() > deadline:
                    self.record.problems.append(f"unpublish of {pod.volume_id}: {error}")
                    shutil.rmtree(self.layout.pods / pod.uid, ignore_errors=True)
                    return
                await asyncio.sleep(ROUND_PAUSE_S)
                continue
            self._attempt(started, "unpublish", pod.spec.store_path)
            return

    def _attempt(self, started: float, call: str, store_path: str, error: str = "") -> None:
        self.record.attempts.append(Attempt(started, self._now(), call, store_path, error))


def kubelet_target(pod_dir: Path) -> Path:
    """Where `Kubelet.publish` puts a pod's volume (its layout, for a publish that failed)."""
    return pod_dir / "volumes" / "kubernetes.io~csi" / "closure" / "mount"
