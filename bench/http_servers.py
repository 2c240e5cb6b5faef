"""Local HTTP servers for the benchmarks: a free loopback port, waiting for a URL to answer,
and nginx serving a binary cache directory (the baseline the mesh is measured against)."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

NGINX = "/usr/sbin/nginx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Nginx:
    """nginx serving `cache` on a free loopback port, logging the bytes of every NAR it sends.

    `host` and `port` pick another address (e.g. a network namespace's, with `prefix` the
    argv that runs nginx inside that namespace)."""

    def __init__(
        self,
        tmp: Path,
        cache: Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.port = free_port() if port is None else port
        self.log = tmp / "nginx-access.log"
        conf = tmp / "nginx.conf"
        conf.write_text(
            f"""
daemon off; worker_processes 2; user root; pid {tmp}/nginx.pid; error_log {tmp}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
  log_format bench '$uri $body_bytes_sent';
  access_log {self.log} bench;
  sendfile on; tcp_nopush on; keepalive_requests 100000;
  default_type application/octet-stream;
  server {{ listen {host}:{self.port}; root {cache}; }}
}}
"""
        )
        self.proc = subprocess.Popen([*prefix, NGINX, "-c", str(conf), "-p", str(tmp)])
        self.url = f"http://{host}:{self.port}"
        wait_http(f"{self.url}/nix-cache-info")

    def nar_bytes(self) -> int:
        if not self.log.exists():
            return 0
        return sum(
            int(line.split()[1])
            for line in self.log.read_text().splitlines()
            if line.startswith("/nar/")
        )

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGQUIT)
        self.proc.wait(30)


def wait_http(url: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > end:
            raise RuntimeError(f"{url} never answered")
        time.sleep(0.1)
