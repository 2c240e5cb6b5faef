"""The demo's story: push -> the app answers from its mounted closure -> a changed commit ->
the new version answers -> rollback -> the old version answers again, with the timeline of
each push. Every step waits for what the services really did (events on the bus, the
manifests the operator rendered, the page over HTTP); nothing is faked on their behalf."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import aiohttp
import nats
from nats.aio.client import Client
from rich.console import Console
from rich.table import Table

from niphas_common.nix.runner import NixRunner
from niphas_common.nix.signing import SecretKey
from niphas_demo import timeline
from niphas_demo.kubelet import Kubelet, Pod, PodSpec, read_deployment
from niphas_demo.layout import (
    WORKLOAD,
    Layout,
    Ports,
    metrics_urls,
    secrets_yaml,
    service_env,
    workload_yaml,
)
from niphas_demo.sample import SampleRepo, add_tools
from niphas_demo.stack import Stack
from niphas_demo.webhook import send_push

T = TypeVar("T")
STEP_TIMEOUT_S = 180.0


@dataclass
class PushResult:
    version: str
    commit: str
    trace_id: str
    store_path: str
    entries: list[timeline.Entry] = field(default_factory=list)


@dataclass
class Outcome:
    pushes: list[PushResult] = field(default_factory=list)
    served: list[tuple[str, str]] = field(default_factory=list)
    """(what, page) for each time the app answered."""
    trace_ids: list[str] = field(default_factory=list)
    metrics: dict[str, str] = field(default_factory=dict)


async def until(
    what: str, probe: Callable[[], Awaitable[T | None]], timeout_s: float = STEP_TIMEOUT_S
) -> T:
    """Poll `probe` until it returns a value (a readiness wait with a clear error)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = await probe()
        if value is not None:
            return value
        if loop.time() > deadline:
            raise TimeoutError(f"{what}: nothing after {timeout_s:.0f}s")
        await asyncio.sleep(0.1)


async def _reconnecting(exc: Exception) -> None:
    """The client reconnects on its own while the server restarts: no traceback per try."""
    logging.getLogger(__name__).debug("NATS: %r", exc)


class Demo:
    def __init__(self, state: Path, console: Console) -> None:
        self.layout = Layout(state)
        self.console = console
        self.ports = Ports.pick()
        self.secret = ""
        self.repo: SampleRepo | None = None
        self.stack: Stack | None = None
        self.nc: Client | None = None
        self.outcome = Outcome()
        self._started = time.monotonic()

    # -- set-up -------------------------------------------------------------------------------

    def prepare(self) -> dict[str, str]:
        """Files the services read (key, webhook secret, workload), the sample repository."""
        layout = self.layout
        for directory in (layout.demo, layout.workloads, layout.pods, layout.cache):
            directory.mkdir(parents=True, exist_ok=True)
        if not layout.key_file.exists():
            layout.key_file.parent.mkdir(parents=True, exist_ok=True)
            key = SecretKey.generate("niphas-demo-1")
            layout.key_file.write_text(str(key))
            layout.key_file.chmod(0o600)
            layout.key_file.with_suffix(".pub").write_text(str(key.public_key))
        public = str(SecretKey.load(layout.key_file).public_key)
        secret_file = layout.demo / "webhook-secret"
        if not secret_file.exists():
            secret_file.write_text(secrets.token_hex(16))
        self.secret = secret_file.read_text().strip()
        layout.secrets_file.write_text(secrets_yaml(self.secret, f"file://{layout.repo}"))
        tools = add_tools(NixRunner(), layout.demo)
        self.repo = SampleRepo(layout.repo, f"path:{tools}")
        self.repo.ensure()
        (layout.workloads / f"{WORKLOAD}.yaml").write_text(
            # On this machine the app answers on loopback only.
            workload_yaml(self.repo.flake_ref, self.ports.app, host="127.0.0.1")
        )
        return service_env(layout, self.ports, public, tools)

    async def start(self, env: dict[str, str], nats_url: str | None = None) -> None:
        """`niphas up` with its embedded NATS, or on the server at `nats_url`."""
        log = self.layout.demo / "niphas-up.log"
        self.stack = Stack(self.layout, self.ports, env, log, nats_url)
        self.stack.start()
        await self.stack.wait_ready()
        self.nc = await nats.connect(
            self.stack.nats_url.split(","),  # one server, or every server of a cluster
            name="niphas-demo",
            error_cb=_reconnecting,
        )
        # A second run starts from a workload that follows builds again (the last run ended
        # pinned by its rollback).
        self.niphas("rollback", WORKLOAD, "--unpin")

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()
        if self.stack is not None:
            await asyncio.to_thread(self.stack.stop)
            self.stack.unmount_node()

    def niphas(self, *args: str) -> str:
        niphas = Path(sys.executable).with_name("niphas")
        assert self.stack is not None
        env = {**self.stack.env, "NATS_URL": self.stack.nats_url}
        out = subprocess.run(
            [str(niphas), *args], env=env, capture_output=True, text=True, check=False
        )
        if out.returncode != 0:
            raise RuntimeError(f"niphas {' '.join(args)} failed: {out.stderr.strip()}")
        return out.stdout.strip()

    # -- steps --------------------------------------------------------------------------------

    async def push(self, version: str) -> PushResult:
        """Commit the page at `version`, deliver the signed webhook, wait for its build."""
        assert self.repo is not None
        assert self.nc is not None
        before, after = self.commit(version)
        url = self.webhook_url()
        status, answer = await send_push(url, self.secret, self.repo.url, before, after)
        if status != 202:
            raise RuntimeError(f"the webhook was answered {status}: {answer}")
        js = self.nc.jetstream()
        raw = await js.get_msg("PUSH_RECEIVED", int(answer["stream_seq"]))
        trace = timeline.trace_id(dict(raw.headers or {}))
        if trace is None:
            raise RuntimeError("push.received carries no traceparent")

        async def built() -> str | None:
            for entry in await timeline.collect(js, trace):
                if entry.subject == "build.done":
                    if not entry.summary.startswith(("built", "cached")):
                        raise RuntimeError(f"build of {after[:12]} failed: {entry.summary}")
                    return entry.store_paths[0]
                if entry.subject == "eval.done" and entry.summary.startswith("failed"):
                    raise RuntimeError(f"evaluation of {after[:12]} failed: {entry.summary}")
            return None

        store_path = await until(f"build.done for {after[:12]}", built)
        result = PushResult(version, after, trace, store_path)
        self.outcome.pushes.append(result)
        self.outcome.trace_ids.append(trace)
        return result

    def commit(self, version: str) -> tuple[str, str]:
        """Commit the sample at `version` where the forge serves it: (before, after)."""
        assert self.repo is not None
        return self.repo.commit_version(version)

    def webhook_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.eval}/hooks/github"

    async def rendered(self, store_path: str) -> PodSpec:
        """Wait until the operator rendered the Deployment running `store_path`."""

        async def probe() -> PodSpec | None:
            try:
                spec = read_deployment(self.layout.deployment())
            except (OSError, ValueError, KeyError):
                return None  # being replaced: read again
            return spec if spec is not None and spec.store_path == store_path else None

        return await until(f"the Deployment on {store_path}", probe)

    async def serve(self, kubelet: Kubelet, spec: PodSpec, what: str) -> tuple[Pod, str]:
        """The pod's life: volume published, command run in it, the page fetched over HTTP."""
        for old in list(kubelet.pods):  # one replica: the old pod goes first (its port)
            await kubelet.delete(old)
        pod = await kubelet.publish(spec)
        kubelet.start(pod, self.layout.demo / f"app-{pod.uid}.log")
        url = f"http://127.0.0.1:{self.ports.app}/"

        async def page() -> str | None:
            if pod.process is not None and pod.process.poll() is not None:
                raise RuntimeError(f"the app exited with {pod.process.returncode}; see {pod.log}")
            try:
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response,
                ):
                    return await response.text() if response.status == 200 else None
            except (aiohttp.ClientError, TimeoutError):
                return None

        text = await until(f"{url} answering", page, timeout_s=30)
        self.outcome.served.append((what, text.strip()))
        return pod, text

    async def fill_timeline(self, result: PushResult) -> None:
        assert self.nc is not None
        result.entries = await timeline.collect(self.nc.jetstream(), result.trace_id)

    async def scrape_metrics(self) -> None:
        async with aiohttp.ClientSession() as session:
            for name, url in metrics_urls(self.ports).items():
                async with session.get(url) as response:
                    self.outcome.metrics[name] = await response.text()

    # -- output -------------------------------------------------------------------------------

    def print_timeline(self, result: PushResult) -> None:
        table = Table(title=f"push {result.version}: commit {result.commit[:12]}", expand=False)
        table.add_column("+ms", justify="right")
        table.add_column("subject")
        table.add_column("what")
        table.add_column("store paths")
        start = result.entries[0].time if result.entries else None
        for entry in result.entries:
            ms = (entry.time - start).total_seconds() * 1000 if start else 0.0
            paths = "\n".join(p.rsplit("/", 1)[-1] for p in entry.store_paths[:3])
            if len(entry.store_paths) > 3:
                paths += f"\n(+{len(entry.store_paths) - 3})"
            table.add_row(f"{ms:.0f}", entry.subject, entry.summary, paths)
        self.console.print(table)
        self.console.print(f"  trace id {result.trace_id}   closure {result.store_path}")

    def print_next_steps(self) -> None:
        state = self.layout.state
        self.console.print("\n[bold]Where to look next[/bold] (while `niphas up` runs):")
        lines = [
            "niphas events streams",
            "niphas events view push.received -n 3",
            "niphas events view build.done -n 3",
            "niphas events view 'path.*' -n 10",
            "niphas events consumers BUILD_DONE",
            f"cat {self.layout.deployment()}",
            f"ls {self.layout.cache}    # the signed binary cache the mesh serves",
        ]
        for line in lines:
            self.console.print(
                f"  NIPHAS_STATE_DIR={state} .venv/bin/{line}"
                if line.startswith("niphas")
                else f"  {line}"
            )
        self.console.print(
            f"  Service logs: {self.layout.demo / 'niphas-up.log'};"
            " spans: set OTEL_EXPORTER_OTLP_ENDPOINT before `make demo`."
        )


def dump_outcome(outcome: Outcome, path: Path) -> None:
    """What a test reads back: the pages served, the traces, the store paths."""
    data = {
        "served": outcome.served,
        "trace_ids": outcome.trace_ids,
        "pushes": [
            {
                "version": p.version,
                "commit": p.commit,
                "trace_id": p.trace_id,
                "store_path": p.store_path,
                "subjects": [e.subject for e in p.entries],
            }
            for p in outcome.pushes
        ],
        "metrics": outcome.metrics,
    }
    path.write_text(json.dumps(data, indent=1))
