"""A node that cannot start fails with one line naming the cause and takes down what it had
started: the host is left as it was (mounts, the bridge, namespaces, cgroups, iptables,
sysctls). These run before the package's node is started (they need the host to themselves).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from niphas_cluster import host
from niphas_cluster.layout import KUBELET_PORT, Layout, kube_cache
from niphas_cluster.node import up
from niphas_cluster.processes import NodeStartError, running

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(180)]


def test_a_taken_kubelet_port_is_named_before_anything_starts() -> None:
    before = host.take_snapshot()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", KUBELET_PORT))
        sock.listen()
        with pytest.raises(NodeStartError, match=f"kubelet's port {KUBELET_PORT} is taken"):
            up(Layout(), log=lambda _m: None)
    assert not running(Layout())
    assert host.leftovers(before, Layout()) == []


def test_a_component_dying_at_start_is_named_and_everything_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real binaries, but an apiserver that fails as one whose port is taken would.
    broken = tmp_path / "kube" / "current"
    broken.mkdir(parents=True)
    for binary in kube_cache().iterdir():
        (broken / binary.name).symlink_to(binary)
    apiserver = broken / "kube-apiserver"
    apiserver.unlink()
    apiserver.write_text(
        "#!/bin/sh\necho 'Error: failed to create listener: address already in use' >&2\nexit 1\n"
    )
    apiserver.chmod(0o755)
    monkeypatch.setenv("NIPHAS_KUBE_CACHE", str(tmp_path / "kube"))
    before = host.take_snapshot()
    with pytest.raises(NodeStartError) as failed:
        up(Layout(), log=lambda _m: None)
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith("kube-apiserver exited during start")
    assert "address already in use" in message
    assert not running(Layout()), "containerd and etcd were stopped again"
    assert host.leftovers(before, Layout()) == []
    assert not Path("/sys/class/net/niphas0").exists()
