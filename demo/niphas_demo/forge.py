"""A forge for a cluster: the demo's git repositories served over git's "dumb" HTTP protocol
(static files after `git update-server-info`) on the node's gateway address, where pods (eval
workers, build pods) and the host reach it. Read-only; pushes happen on the host."""

from __future__ import annotations

import functools
import http.server
import subprocess
import threading
from pathlib import Path

from niphas_cluster.layout import GATEWAY


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class GitForge:
    def __init__(self, root: Path, host: str = GATEWAY) -> None:
        self.root = root
        self.host = host
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "the forge is not started"
        return f"http://{self.host}:{self._server.server_address[1]}"

    def url(self, repo: Path) -> str:
        """The clone URL of the repository in `repo` (its .git dir, served as files)."""
        return f"{self.base_url}/{repo.relative_to(self.root)}/.git"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        handler = functools.partial(_Quiet, directory=str(self.root))
        self._server = http.server.ThreadingHTTPServer((self.host, 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def publish(self, repo: Path) -> None:
        """Refresh the files dumb-HTTP clients read (refs, packs) after a commit."""
        subprocess.run(["git", "-C", str(repo), "update-server-info"], check=True)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
