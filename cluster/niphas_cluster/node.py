"""Starting and stopping the whole node: `up` returns once the node is Ready (and leaves it
running); `down` stops everything `up` started and puts the host back as it was."""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import host
from .control_plane import start_apiserver, start_controllers, start_etcd, start_kube_proxy
from .dns import start_dns
from .images import ensure_pause_image, import_niphas_image
from .kubelet import start_kubelet
from .layout import KUBELET_PORT, NODE_NAME, Layout
from .pki import write_credentials, write_kubeconfig
from .processes import ORDER, NodeStartError, died, pid_of, running, stop
from .runtime import remove_all_containers, start_containerd
from .storage import offer_volumes

READY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Node:
    layout: Layout
    server: str
    ca_file: Path
    kubeconfig: Path
    token: str


@contextlib.contextmanager
def _host_lock(layout: Layout) -> Iterator[None]:
    layout.lock.parent.mkdir(parents=True, exist_ok=True)
    with layout.lock.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise NodeStartError(
                f"another process is starting or stopping the node ({layout.lock} is locked)"
            ) from None
        yield


def up(layout: Layout | None = None, log: Callable[[str], None] = print) -> Node:
    layout = layout or Layout()
    with _host_lock(layout):
        if running(layout):
            names = ", ".join(running(layout))
            raise NodeStartError(
                f"a node already runs on this host ({names}); `make cluster-down` stops it"
            )
        _preflight(layout)
        started = time.monotonic()
        snapshot = host.take_snapshot()
        snapshot.save(layout.host_snapshot)
        try:
            node = _start(layout, log)
        except BaseException:
            _down(layout, log=lambda _msg: None)
            raise
        log(f"node {NODE_NAME} Ready in {time.monotonic() - started:.1f} s")
        return node


def _start(layout: Layout, log: Callable[[str], None]) -> Node:
    for old in (layout.work, layout.logs):
        shutil.rmtree(old, ignore_errors=True)
    layout.work.mkdir(parents=True)
    creds = write_credentials(layout.work)
    log("starting containerd")
    start_containerd(layout)
    _wait(layout, "containerd", layout.containerd_socket.exists, 30)
    ensure_pause_image(layout)
    etcd_url = start_etcd(layout)
    log("starting etcd and kube-apiserver")
    server, ca_file = start_apiserver(layout, etcd_url, creds)
    _wait(layout, "kube-apiserver", lambda: _healthy(server, ca_file, creds.tokens["admin"]), 90)
    for name in ("admin", "kubelet", "controller-manager", "scheduler", "kube-proxy"):
        write_kubeconfig(layout.work / f"{name}.kubeconfig", server, ca_file, creds.tokens[name])
    log("starting cluster DNS, controller-manager, scheduler, kube-proxy and kubelet")
    start_dns(layout, server, ca_file, creds.tokens["dns"])
    start_controllers(layout, ca_file, creds)
    start_kube_proxy(layout)
    if import_niphas_image(layout):
        log("the niphas image is in the node's containerd")
    start_kubelet(layout)
    token = creds.tokens["admin"]
    offer_volumes(layout, _kubectl())
    _wait(layout, "kubelet", lambda: _node_ready(server, ca_file, token), READY_TIMEOUT_S)
    return Node(layout, server, ca_file, layout.admin_kubeconfig, token)


def restart_kubelet(node: Node) -> None:
    """Stop the kubelet and start it again (pods keep running), until the node is Ready."""
    stop(node.layout, "kubelet")
    start_kubelet(node.layout)
    ready = lambda: _node_ready(node.server, node.ca_file, node.token)  # noqa: E731
    _wait(node.layout, "kubelet", ready, READY_TIMEOUT_S)


def _preflight(layout: Layout) -> None:
    if "overlay" not in Path("/proc/filesystems").read_text():
        raise NodeStartError("the kernel has no overlay file system (containerd's snapshotter)")
    if (
        not Path("/sys/fs/cgroup/memory").is_dir()
        and not Path("/sys/fs/cgroup/cgroup.controllers").exists()
    ):
        raise NodeStartError("no memory cgroup controller is mounted under /sys/fs/cgroup")
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", KUBELET_PORT))
        except OSError as exc:
            raise NodeStartError(f"kubelet's port {KUBELET_PORT} is taken: {exc}") from None


def _wait(layout: Layout, name: str, ready: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for daemon in ORDER:
            if (layout.pids / f"{daemon}.pid").exists() and pid_of(layout, daemon) is None:
                raise died(layout, daemon)
        if ready():
            return
        time.sleep(0.25)
    raise NodeStartError(f"{name} not ready after {timeout_s:.0f} s (logs in {layout.logs})")


def _get(server: str, ca_file: Path, token: str, path: str) -> bytes | None:
    if not ca_file.exists():
        return None
    request = urllib.request.Request(server + path, headers={"Authorization": f"Bearer {token}"})
    context = ssl.create_default_context(cafile=str(ca_file))
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as response:
            body: bytes = response.read()
            return body
    except (OSError, urllib.error.URLError, ssl.SSLError):
        return None


def _healthy(server: str, ca_file: Path, token: str) -> bool:
    return _get(server, ca_file, token, "/readyz") == b"ok"


def _node_ready(server: str, ca_file: Path, token: str) -> bool:
    body = _get(server, ca_file, token, f"/api/v1/nodes/{NODE_NAME}")
    if body is None:
        return False
    conditions = json.loads(body).get("status", {}).get("conditions", [])
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def down(layout: Layout | None = None, log: Callable[[str], None] = print) -> list[str]:
    """Stop the node; returns what was left behind (empty when the host is clean)."""
    layout = layout or Layout()
    with _host_lock(layout):
        return _down(layout, log)


def _down(layout: Layout, log: Callable[[str], None]) -> list[str]:
    snapshot = host.Snapshot.load(layout.host_snapshot)
    # Controllers first, so no pod is recreated while the kubelet tears them down.
    for name in ("kube-controller-manager", "kube-scheduler"):
        stop(layout, name)
    if pid_of(layout, "kubelet") is not None and pid_of(layout, "kube-apiserver") is not None:
        log("deleting pods (volumes unpublished, networks torn down by the kubelet)")
        _drain(layout)
    stop(layout, "kubelet")
    if pid_of(layout, "containerd") is not None:
        remove_all_containers(layout)
    for name in ("kube-proxy", "dns-sync", "dnsmasq", "containerd", "kube-apiserver", "etcd"):
        stop(layout, name)
    if snapshot is None:
        return []
    host.remove_netns(snapshot)
    host.remove_bridge()
    left = host.unmount_new(snapshot, layout)
    left += host.remove_cgroups()
    left += host.restore(snapshot)
    shutil.rmtree(layout.kubelet_root, ignore_errors=True)
    shutil.rmtree(layout.work, ignore_errors=True)
    shutil.rmtree(layout.run, ignore_errors=True)
    left += host.leftovers(snapshot, layout)
    log("node stopped" + (f"; left behind: {', '.join(left)}" if left else ", host clean"))
    return left


def _kubectl() -> str:
    """The venv's kubectl beside this interpreter, else one on PATH."""
    beside = Path(sys.executable).with_name("kubectl")
    return str(beside) if beside.exists() else shutil.which("kubectl") or "kubectl"


def _drain(layout: Layout, timeout_s: float = 30.0) -> None:
    kubeconfig = str(layout.admin_kubeconfig)
    kubectl = _kubectl()
    subprocess.run(
        [kubectl, "--kubeconfig", kubeconfig, "delete", "pods", "--all", "--all-namespaces",
         "--grace-period=1", "--wait=false"],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        listed = subprocess.run(
            [kubectl, "--kubeconfig", kubeconfig, "get", "pods", "-A", "-o", "name"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        if listed.returncode != 0 or not listed.stdout.strip():
            return
        time.sleep(0.5)
