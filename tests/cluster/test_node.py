"""The real node of `make cluster` (niphas_cluster): Ready, a pod runs on the CNI bridge,
nothing of it talks to an address outside loopback and the pod network, and a second node on
the same host is refused with a message naming the running one. The teardown's check that the
host is left clean runs at the end of the session (tests/node_harness.py)."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from niphas_cluster.layout import NODE_NAME, PAUSE_IMAGE, POD_SUBNET, Layout
from niphas_cluster.node import Node, up
from niphas_cluster.processes import NodeStartError, running
from niphas_demo.on_cluster import ready as pod_ready
from tests.cluster.pods import new_namespace, wait_for
from tests.node_harness import Kubectl

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(300)]


def test_a_pod_runs_on_the_pod_network(real_node: Node, node_kubectl: Kubectl) -> None:
    node = node_kubectl("get", "node", NODE_NAME, "-o", "jsonpath={.status.conditions[-1:]}")
    assert '"Ready"' in node.stdout and '"True"' in node.stdout
    namespace = new_namespace(node_kubectl)
    node_kubectl(
        "-n", namespace, "run", "sleeper", f"--image={PAUSE_IMAGE}",
        "--image-pull-policy=Never", "--restart=Never",
    )  # fmt: skip
    pod = wait_for(node_kubectl, namespace, "pod", "sleeper", lambda p: p["status"].get("podIP"))
    assert pod["status"]["phase"] in ("Pending", "Running")
    ip = ipaddress.ip_address(pod["status"]["podIP"])
    assert ip in ipaddress.ip_network(POD_SUBNET)
    # The host holds the bridge's gateway address: it reaches the pod.
    ping = subprocess.run(["ping", "-c", "1", "-W", "2", str(ip)], capture_output=True, check=False)
    assert ping.returncode == 0, ping.stdout


def test_nothing_leaves_loopback_and_the_pod_network(real_node: Node) -> None:
    pids = running(real_node.layout)
    assert set(pids) >= {"containerd", "etcd", "kube-apiserver", "kubelet"}
    kubelet_env = Path(f"/proc/{pids['kubelet']}/environ").read_bytes().split(b"\0")
    assert b"AWS_EC2_METADATA_DISABLED=true" in kubelet_env
    allowed = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network(POD_SUBNET)]
    sockets = subprocess.run(
        ["ss", "-tunapH"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for line in sockets:
        if not any(f"pid={pid}," in line for pid in pids.values()):
            continue
        peer = line.split()[5].rsplit(":", 1)[0].strip("[]")
        if peer in ("*", "0.0.0.0", "::"):
            continue
        address = ipaddress.ip_address(peer.removeprefix("::ffff:"))
        assert address.is_loopback or any(address in net for net in allowed), line


def test_a_second_node_on_the_host_is_refused(real_node: Node) -> None:
    with pytest.raises(NodeStartError, match="already runs on this host"):
        up(Layout(), log=lambda _m: None)
    assert set(running(real_node.layout)) >= {"kube-apiserver", "kubelet"}


CLIENT = """\
import socket, ssl, time, urllib.request
for _ in range(50):  # the node's DNS learns a new Service within a second
    try:
        print("web", socket.gethostbyname("web"))
        break
    except OSError:
        time.sleep(0.2)
for attempt in range(50):  # kube-proxy programs a new endpoint a moment after it is ready
    try:
        print("status", urllib.request.urlopen("http://web/", timeout=5).status)
        break
    except OSError as error:
        if attempt == 49:
            print("web unreachable:", error)
        time.sleep(0.2)
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
request = urllib.request.Request(
    "https://kubernetes.default.svc/api",
    headers={"Authorization": "Bearer " + open(sa + "/token").read()},
)
context = ssl.create_default_context(cafile=sa + "/ca.crt")
print("api", urllib.request.urlopen(request, timeout=5, context=context).status)
try:
    socket.gethostbyname("deb.debian.org")
    print("outside resolves")
except OSError:
    print("outside unknown")
"""


def web_pod(image: str) -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {"containers": [{
            "name": "web", "image": image, "imagePullPolicy": "Never",
            "command": ["python3", "-m", "http.server", "8000"],
            "readinessProbe": {"tcpSocket": {"port": 8000}, "periodSeconds": 1},
        }]},
    })  # fmt: skip


def has_address(endpoints: dict[str, Any]) -> bool:
    return any(subset.get("addresses") for subset in endpoints.get("subsets") or [])


def test_pods_find_services_by_name_and_the_api_with_their_service_account(
    real_node: Node, node_kubectl: Kubectl, niphas_image: str
) -> None:
    namespace = new_namespace(node_kubectl)
    node_kubectl("-n", namespace, "apply", "-f", "-", input=web_pod(niphas_image))
    node_kubectl("-n", namespace, "expose", "pod", "web", "--port=80", "--target-port=8000")
    # Ready only once it listens (the probe), then the Service has it as an endpoint.
    wait_for(node_kubectl, namespace, "pod", "web", pod_ready)
    wait_for(node_kubectl, namespace, "endpoints", "web", has_address)
    node_kubectl(
        "-n", namespace, "run", "client", f"--image={niphas_image}",
        "--image-pull-policy=Never", "--restart=Never", "--command", "--",
        "python3", "-c", CLIENT,
    )  # fmt: skip
    wait_for(
        node_kubectl, namespace, "pod", "client",
        lambda p: p["status"].get("phase") in ("Succeeded", "Failed"),
    )  # fmt: skip
    out = node_kubectl("-n", namespace, "logs", "client").stdout
    service_ip = node_kubectl(
        "-n", namespace, "get", "service", "web", "-o", "jsonpath={.spec.clusterIP}"
    ).stdout
    assert f"web {service_ip}" in out, out
    assert "status 200" in out
    assert "api 200" in out
    # Cluster names only: nothing outside the cluster is looked up.
    assert "outside unknown" in out
