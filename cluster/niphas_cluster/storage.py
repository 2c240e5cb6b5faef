"""Storage for the node's PersistentVolumeClaims: no provisioner runs here, so the node
offers a few hostPath PersistentVolumes without a storage class (a claim without a class binds
to one of them), each a directory under the node's work dir, writable by any user (pods that
run as a non-root user own nothing on the host)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .layout import Layout

VOLUMES = 6
SIZE = "20Gi"


def volume(name: str, path: Path) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "labels": {"niphas.io/node-volume": "true"}},
        "spec": {
            "capacity": {"storage": SIZE},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "hostPath": {"path": str(path), "type": "Directory"},
        },
    }


def offer_volumes(layout: Layout, kubectl: str) -> None:
    items = []
    for i in range(VOLUMES):
        path = layout.work / "volumes" / f"pv{i}"
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o1777)
        items.append(volume(f"niphas-node-pv{i}", path))
    subprocess.run(
        [kubectl, "--kubeconfig", str(layout.admin_kubeconfig), "apply", "-f", "-"],
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
