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


class Stack:
    def __init__(self, layout: Layout, ports: Ports, env: dict[str, str], log: Path) -> None:
        self.layout = layout
        self.ports = ports
        self.env = {**os.environ, **env}
        self.env.pop("NATS_URL", None)  # the embedded server, always
        self._log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        (self.layout.state / URL_FILE).unlink(missing_ok=True)
        niphas = Path(sys.executable).with_name("niphas")
        with self._log.open("ab") as out:
            self.process = subprocess.Popen(
                [str(niphas), "up"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def nats_url(self) -> str:
        return (self.layout.state / URL_FILE).read_text().strip()

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
                ready = not pending and sock.exists() and (self.layout.state / URL_FILE).exists()
                if ready:
                    return
                if loop.time() > deadline:
                    waiting = ", ".join(pending) or "the csi socket"
                    raise RuntimeError(
                        f"not ready after {timeout_s:.0f}s: {waiting}; see {self._log}"
                    )
                await asyncio.sleep(0.2)

    def _urls(self) -> dict[str, str]:
        return metrics_urls(self.ports)

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"niphas up exited with {self.process.returncode}; see {self._log}")

    def unmount_node(self) -> None:
        """Once the stack is down and no pod is left: the CSI driver keeps its staging area
        (a private mount point and a tmpfs) mounted across restarts, as a node does; the demo
        is the whole node, so it takes them down too and leaves no mount behind."""
        prefix = str(self.layout.state) + "/"
        points = []
        for line in Path("/proc/self/mounts").read_text().splitlines():
            point = line.split()[1].replace("\\040", " ")
            if point.startswith(prefix):
                points.append(point)
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)

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
