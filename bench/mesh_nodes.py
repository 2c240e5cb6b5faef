"""Simulated mesh nodes for the benchmarks: generated closures of random files added to the
host store, and `niphas mesh` processes, one per node over its own chroot store (each in its
CPU share, if any). Shared by bench_mesh and bench_fanout."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.cpu_shares import CpuShares
from bench.http_servers import free_port, wait_http
from niphas_common.nix.runner import NixRunner
from niphas_common.nix.store_path import StorePath

ROOT = Path(__file__).resolve().parents[1]


def make_paths(base: Path, label: str, size: int, files: int, n_paths: int) -> list[Path]:
    """`n_paths` directories of random files, ~size bytes and ~files files in all."""
    dirs = []
    per_path, per_files = size // n_paths, max(1, files // n_paths)
    for p in range(n_paths):
        d = base / f"{label}-{p:02}"
        left = per_path
        for i in range(per_files):
            # Sizes vary (a few large, many small) around the mean.
            n = (
                left
                if i == per_files - 1
                else min(left, (per_path // per_files) * (1 + (i % 7)) // 4)
            )
            sub = d / f"d{i % 13}"
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"f{i:05}").write_bytes(os.urandom(max(n, 1)))
            left -= n
        dirs.append(d)
    return dirs


def add(host: NixRunner, dirs: list[Path]) -> list[StorePath]:
    out = host.run("nix-store", "--add", *map(str, dirs)).text.split()
    return [StorePath.parse(p) for p in out]


class Agents:
    """`niphas mesh` processes, one per simulated node (each in its CPU share, if any)."""

    def __init__(
        self, tmp: Path, nats_url: str, public_key: str, shares: CpuShares | None = None
    ) -> None:
        self.tmp, self.nats_url, self.public_key = tmp, nats_url, public_key
        self.shares = shares
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.urls: dict[str, str] = {}

    def start(
        self,
        node: str,
        host: str = "127.0.0.1",
        port: int | None = None,
        prefix: Sequence[str] = (),
    ) -> str:
        """Start the node's agent listening on `host:port` (default a free loopback port),
        its argv after `prefix` (e.g. `ip netns exec <its namespace>`); its URL once ready."""
        port = free_port() if port is None else port
        env = {
            **os.environ,
            "NIPHAS_MESH_STATE_DIR": str(self.tmp / "state"),
            "NIPHAS_MESH_TRUSTED_PUBLIC_KEYS": self.public_key,
            "NIPHAS_LOG_LEVEL": "WARNING",
        }
        niphas = str(Path(sys.executable).with_name("niphas"))
        argv = [*prefix, niphas, "mesh", "--listen", f"{host}:{port}", "--node", node]
        argv += ["--store-root", str(self.tmp / "nodes" / node), "--nats-url", self.nats_url]
        if self.shares is not None:
            argv = self.shares.wrap(node, argv)
        self.procs[node] = subprocess.Popen(argv, env=env)
        url = f"http://{host}:{port}"
        wait_http(f"{url}/readyz")
        self.urls[node] = url
        return url

    def cpu_seconds(self, node: str) -> float:
        """CPU time of the node's agent and of the `nix` processes it has reaped."""
        return sum(self.cpu_split(node))

    def cpu_split(self, node: str) -> tuple[float, float]:
        """CPU time of the node's agent itself, and of the `nix` processes it has reaped."""
        fields = Path(f"/proc/{self.procs[node].pid}/stat").read_text().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        own, reaped = fields[11:13], fields[13:15]
        return sum(int(t) for t in own) / tick, sum(int(t) for t in reaped) / tick

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
