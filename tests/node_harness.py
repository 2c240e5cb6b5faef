"""A real single-node Kubernetes (kubelet + containerd) once per test session, for tests that
ask for one (`niphas_cluster`: the same node `make cluster` starts).

The binaries and packages are installed by `scripts/setup-node.sh` at collection when a
collected test uses the node, so a first build never counts against a test's timeout. The
teardown stops everything and fails the session if anything was left behind on the host
(mounts, cgroups, the bridge, network namespaces, iptables rules, sysctls). Only one node runs
per host: a second test session started meanwhile fails at once naming the running node.

Fixtures (defined in tests/cluster/conftest.py with package scope, so the node is gone as
soon as the tests that use it are done, before the rest of the suite runs):
- `real_node`: a `niphas_cluster.node.Node` (`.kubeconfig`, `.server`, `.token`).
- `node_kubectl`: run kubectl against it.
- `niphas_image`: the platform's image, built at collection, imported when the node starts.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from niphas_cluster.layout import Layout
from niphas_cluster.node import Node, down, up
from tests.kube_harness import kubectl_binary

REPO_ROOT = Path(__file__).resolve().parent.parent
SETUP_SCRIPT = REPO_ROOT / "scripts" / "setup-node.sh"
IMAGE_SCRIPT = REPO_ROOT / "scripts" / "build-image.sh"

Kubectl = Callable[..., subprocess.CompletedProcess[str]]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    used = [getattr(item, "fixturenames", ()) for item in items]
    if any("real_node" in names for names in used):
        subprocess.run(["bash", str(SETUP_SCRIPT)], check=True, stdout=subprocess.DEVNULL)
    if any("niphas_image" in names for names in used):
        subprocess.run(["bash", str(IMAGE_SCRIPT)], check=True, stdout=subprocess.DEVNULL)


@contextlib.contextmanager
def running_node() -> Iterator[Node]:
    """The node for the duration of the block; fails if its teardown left anything behind."""
    layout = Layout()
    node = up(layout, log=lambda _msg: None)
    try:
        yield node
    finally:
        left = down(layout, log=lambda _msg: None)
        assert not left, f"the node left things behind on the host: {left}"


def node_kubectl_for(real_node: Node) -> Kubectl:
    kubectl = kubectl_binary() or "kubectl"

    def run(
        *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [kubectl, "--kubeconfig", str(real_node.kubeconfig), *args],
            input=input, capture_output=True, text=True, check=check, timeout=timeout,
        )  # fmt: skip

    return run
