"""Private git forges on loopback: `git http-backend` (git's own smart HTTP server, run as a
CGI) behind HTTP basic authentication, one token per repository, recording every request's
repository and credentials so tests can tell which secret went where; and `sshd` accepting
one deploy key."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web


@dataclass
class GitForge:
    url: str
    """`http://127.0.0.1:PORT`; a repository `<root>/<name>` is `<url>/<name>/.git`."""
    tokens: dict[str, tuple[str, str]]
    seen: list[tuple[str, str | None]] = field(default_factory=list)
    """(repository, the Authorization header or None) per request."""

    def repo_url(self, name: str) -> str:
        return f"{self.url}/{name}/.git"

    def authorizations(self, repository: str) -> set[str | None]:
        return {auth for repo, auth in self.seen if repo == repository}


def basic(user: str, token: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()


@asynccontextmanager
async def git_forge(root: Path, tokens: dict[str, tuple[str, str]]) -> AsyncIterator[GitForge]:
    """Serve the repositories under `root`; `tokens`: repository name -> (user, token)."""
    forge = GitForge("", tokens)

    async def handle(request: web.Request) -> web.StreamResponse:
        repo = request.path.strip("/").split("/", 1)[0]
        auth = request.headers.get("Authorization")
        forge.seen.append((repo, auth))
        if repo not in tokens or auth != basic(*tokens[repo]):
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="git"'})
        body = await request.read()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": request.path,
            "REQUEST_METHOD": request.method,
            "QUERY_STRING": request.query_string,
            "CONTENT_TYPE": request.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": tokens[repo][0],
            "REMOTE_ADDR": "127.0.0.1",
            "HTTP_GIT_PROTOCOL": request.headers.get("Git-Protocol", ""),
        }
        proc = await asyncio.create_subprocess_exec(
            "git", "http-backend", env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await proc.communicate(body)
        head, _, payload = out.partition(b"\r\n\r\n")
        status, headers = 200, {}
        for line in head.decode().split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers[name] = value.strip()
        return web.Response(status=status, headers=headers, body=payload)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    forge.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield forge
    finally:
        await runner.cleanup()


@dataclass
class SshForge:
    url: str
    """`ssh://root@127.0.0.1:PORT`; a repository `<root>/<name>` is `<url><root>/<name>/.git`."""
    key_file: Path
    """The private key sshd accepts (a deploy key)."""
    known_hosts: Path


@asynccontextmanager
async def ssh_forge(root: Path, work: Path) -> AsyncIterator[SshForge]:
    """`sshd` on a loopback port accepting one key, serving the repositories under `root`
    through git's upload-pack (started and stopped here; no daemon is left running)."""
    work.mkdir(parents=True, exist_ok=True)
    host_key, client_key = work / "host_ed25519", work / "deploy_ed25519"
    for key in (host_key, client_key):
        await _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
    (work / "authorized_keys").write_text(client_key.with_suffix(".pub").read_text())
    client_key.chmod(0o644)  # as a mounted Secret's file is
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = work / "sshd_config"
    config.write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {host_key}\n"
        f"AuthorizedKeysFile {work}/authorized_keys\nPidFile {work}/sshd.pid\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "PermitRootLogin prohibit-password\nStrictModes no\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation
    with (work / "sshd.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            "/usr/sbin/sshd", "-D", "-e", "-f", str(config),
            stdout=asyncio.subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    known = work / "known_hosts"
    public = host_key.with_suffix(".pub").read_text().split()
    known.write_text(f"[127.0.0.1]:{port} {public[0]} {public[1]}\n")
    try:
        for _ in range(100):  # until it listens
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            await asyncio.sleep(0.05)
        yield SshForge(f"ssh://root@127.0.0.1:{port}", client_key, known)
    finally:
        proc.terminate()
        await proc.wait()


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv)
    assert await proc.wait() == 0, argv
