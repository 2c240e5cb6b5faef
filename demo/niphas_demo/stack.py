"""`niphas up` as a child of the demo, configured for the embedded default, and the waits for
each service to be ready. It runs in its own session so a Ctrl-C reaches the demo first: the
demo unpublishes its volumes while the CSI driver still runs, then stops the stack."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

from niphas_common.nats_server import URL_FILE
from niphas_demo.layout import Layout, Ports, metrics_urls

STOP_GRACE_S = 40.0


def child_pids(pid: int) -> list[int]:
    """The direct children of `pid` (empty when it is gone)."""
    children: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return children
    for task in tasks:
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return children


def unmount_below(root: Path) -> int:
    """Lazily unmount everything mounted below `root`, deepest first; how many."""
    prefix = str(root) + "/"
    points = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = line.split()[1].replace("\\040", " ")
        if point.startswith(prefix):
            points.append(point)
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    return len(points)


class Stack:
    def __init__(
        self,
        layout: Layout,
        ports: Ports,
        env: dict[str, str],
        log: Path,
        nats_url: str | None = None,
    ) -> None:
        """`nats_url`: a server the caller runs (e.g. to restart it); None: `niphas up`
        embeds one."""
        self.layout = layout
        self.ports = ports
        self.env = {**os.environ, **env}
        self.env.pop("NATS_URL", None)
        if nats_url is not None:
            self.env["NATS_URL"] = nats_url
        self._nats_url = nats_url
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        (self.layout.state / URL_FILE).unlink(missing_ok=True)
        niphas = Path(sys.executable).with_name("niphas")
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [str(niphas), "up"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def nats_url(self) -> str:
        if self._nats_url is not None:
            return self._nats_url
        return (self.layout.state / URL_FILE).read_text().strip()

    def service_pids(self) -> dict[str, int]:
        """The running services: name -> pid of the process `niphas up` started for it."""
        if self.process is None or self.process.poll() is not None:
            return {}
        pids: dict[str, int] = {}
        for pid in child_pids(self.process.pid):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue  # gone meanwhile
            # `python -m niphas_common <service>` (argv ends with an empty string)
            if len(argv) >= 4 and argv[-3] == b"niphas_common":
                pids[argv[-2].decode()] = pid
        return pids

    async def wait_ready(self, timeout_s: float = 90.0) -> None:
        """NATS up, every service's /readyz answering 200 and the CSI socket present."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        pending = {name: url.replace("/metrics", "/readyz") for name, url in self._urls().items()}
        async with aiohttp.ClientSession() as session:
            while True:
                self._check_alive()
                for name, url in list(pending.items()):
                    try:
                        async with session.get(url) as response:
                            if response.status == 200:
                                del pending[name]
                    except aiohttp.ClientError:
                        pass
                sock = self.layout.csi_socket
                url_known = self._nats_url is not None or (self.layout.state / URL_FILE).exists()
                ready = not pending and sock.exists() and url_known
                if ready:
                    return
                if loop.time() > deadline:
                    waiting = ", ".join(pending) or "the csi socket"
                    raise RuntimeError(
                        f"not ready after {timeout_s:.0f}s: {waiting}; see {self.log}"
                    )
                await asyncio.sleep(0.2)

    def _urls(self) -> dict[str, str]:
        return metrics_urls(self.ports)

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"niphas up exited with {self.process.returncode}; see {self.log}")

    def unmount_node(self) -> None:
        """Once the stack is down and no pod is left: the CSI driver keeps its staging area
        (a private mount point and a tmpfs) mounted across restarts, as a node does; the demo
        is the whole node, so it takes them down too and leaves no mount behind."""
        unmount_below(self.layout.state)

    def stop(self) -> None:
        """SIGTERM `niphas up` (it stops the services, then NATS) and wait for it."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
