"""Two operator processes (`niphas operator`) against one apiserver: only the Lease holder
reconciles (the standby's reconcile counter stays at zero, while both are ready), and killing
the leader with SIGKILL hands the Lease, and the work, to the standby."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from niphas_operator.settings import OperatorSettings
from tests.helpers import eventually, terminate
from tests.niphas_operator.conftest import Kubectl, store_path, workload

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class OperatorProcess:
    def __init__(self, identity: str, settings: OperatorSettings, nats_url: str, log: Path):
        self.identity = identity
        self.port = _free_port()
        env = {
            **os.environ,
            "NATS_URL": nats_url,
            "NIPHAS_OPERATOR_KUBECONFIG": str(settings.kubeconfig),
            "NIPHAS_OPERATOR_NAMESPACE": str(settings.namespace),
            "NIPHAS_OPERATOR_LEASE_NAMESPACE": settings.lease_namespace,
            "NIPHAS_OPERATOR_IDENTITY": identity,
            "NIPHAS_OPERATOR_LEASE_DURATION_S": "5",
            "NIPHAS_OPERATOR_RENEW_PERIOD_S": "0.5",
            "NIPHAS_OPERATOR_METRICS_PORT": str(self.port),
            "NIPHAS_OPERATOR_STATE_DIR": str(settings.state_dir),
        }
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "niphas_common", "operator"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def reconciles(self) -> float:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return -1.0
        total = 0.0
        for line in text.splitlines():
            if line.startswith("niphas_operator_reconciles_total{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        terminate(self.proc)


@pytest.fixture
def operators(
    operator_settings: OperatorSettings, nats_url: str, tmp_path: Path
) -> Iterator[dict[str, OperatorProcess]]:
    procs = {
        name: OperatorProcess(name, operator_settings, nats_url, tmp_path / f"{name}.log")
        for name in ("operator-a", "operator-b")
    }
    try:
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


def _holder(kubectl: Kubectl) -> str | None:
    lease = kubectl.get("lease", "niphas-operator")
    if lease is None:
        return None
    holder: str | None = lease["spec"].get("holderIdentity")
    return holder


async def test_only_the_leader_reconciles_and_killing_it_hands_over(
    kubectl: Kubectl, operators: dict[str, OperatorProcess]
) -> None:
    kubectl.apply(workload("one", storePath=store_path("one-1.0")))
    await eventually(lambda: _holder(kubectl) in operators, 60)
    await eventually(lambda: kubectl.get("deployment", "one") is not None, 60)
    leader_name = _holder(kubectl)
    assert leader_name is not None
    leader = operators[leader_name]
    standby = next(p for name, p in operators.items() if name != leader_name)
    await eventually(lambda: standby.reconciles() >= 0, 30)  # its metrics server is up
    assert leader.reconciles() > 0
    assert standby.reconciles() == 0
    await eventually(lambda: leader.ready() and standby.ready(), 30)  # a standby is ready too

    leader.proc.send_signal(signal.SIGKILL)
    leader.proc.wait(10)
    await eventually(lambda: _holder(kubectl) == standby.identity, 60)
    kubectl.apply(workload("two", storePath=store_path("two-1.0")))
    await eventually(lambda: kubectl.get("deployment", "two") is not None, 60)
    assert standby.reconciles() > 0
    lease = kubectl.get("lease", "niphas-operator")
    assert lease is not None
    assert lease["spec"]["leaseTransitions"] >= 1
    assert json.dumps(lease)  # readable, for the failure message if any of the above fails
