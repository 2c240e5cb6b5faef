"""etcd, kube-apiserver, kube-controller-manager and kube-scheduler on loopback.

The apiserver authorises with Node + RBAC (so the platform's own RBAC is exercised) and
admits with ServiceAccount and NodeRestriction on; the controller-manager signs
service-account tokens with the node's key and runs every default controller.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

from .layout import GATEWAY, NODE_NAME, POD_SUBNET, SERVICE_CIDR, Layout, kube_cache
from .pki import Credentials
from .processes import spawn


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def start_etcd(layout: Layout) -> str:
    client, peer = free_port(), free_port()
    client_url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    spawn(
        layout,
        "etcd",
        [
            shutil.which("etcd") or "/usr/bin/etcd",
            "--name=niphas",
            f"--data-dir={layout.work / 'etcd'}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=niphas={peer_url}",
            "--log-level=warn",
            "--unsafe-no-fsync",
        ],
    )
    return client_url


def start_apiserver(layout: Layout, etcd_url: str, creds: Credentials) -> tuple[str, Path]:
    """Returns the server URL and the CA that signed its certificate. It serves on the
    node's gateway address: host processes and, through the `kubernetes` Service, pods."""
    port = free_port(GATEWAY)
    spawn(
        layout,
        "kube-apiserver",
        [
            str(kube_cache() / "kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            f"--secure-port={port}",
            f"--bind-address={GATEWAY}",
            f"--advertise-address={GATEWAY}",
            f"--tls-cert-file={creds.serving_cert}",
            f"--tls-private-key-file={creds.serving_key}",
            f"--token-auth-file={creds.token_file}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={creds.sa_key}",
            f"--service-account-signing-key-file={creds.sa_key}",
            # kubelet is named by its loopback address and serves there.
            "--kubelet-preferred-address-types=Hostname,InternalIP",
            "--allow-privileged=true",
            "--profiling=false",
            "--v=1",
        ],
    )
    return f"https://{GATEWAY}:{port}", creds.ca_file


def start_controllers(layout: Layout, ca_file: Path, creds: Credentials) -> None:
    cache = kube_cache()
    spawn(
        layout,
        "kube-controller-manager",
        [
            str(cache / "kube-controller-manager"),
            f"--kubeconfig={layout.work / 'controller-manager.kubeconfig'}",
            f"--service-account-private-key-file={creds.sa_key}",
            f"--root-ca-file={ca_file}",
            "--use-service-account-credentials=true",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--port=0",
            "--secure-port=0",
            "--controllers=*",
            "--node-monitor-grace-period=20s",
            "--profiling=false",
            "--v=1",
        ],
    )
    spawn(
        layout,
        "kube-scheduler",
        [
            str(cache / "kube-scheduler"),
            f"--kubeconfig={layout.work / 'scheduler.kubeconfig'}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--port=0",
            "--secure-port=0",
            "--profiling=false",
            "--v=1",
        ],
    )


def start_kube_proxy(layout: Layout) -> None:
    """Service ClusterIPs through iptables. Every service connection is masqueraded: pods have
    no default route, only the pod subnet and the service range through the gateway, so
    replies must come back through the host."""
    spawn(
        layout,
        "kube-proxy",
        [
            str(kube_cache() / "kube-proxy"),
            f"--kubeconfig={layout.work / 'kube-proxy.kubeconfig'}",
            "--proxy-mode=iptables",
            "--masquerade-all",
            f"--cluster-cidr={POD_SUBNET}",
            f"--hostname-override={NODE_NAME}",
            "--bind-address=127.0.0.1",
            "--healthz-bind-address=127.0.0.1:10256",
            "--metrics-bind-address=127.0.0.1:10249",
            # Leave the host's conntrack limits and timeouts alone.
            "--conntrack-max-per-core=0",
            "--conntrack-tcp-timeout-established=0",
            "--conntrack-tcp-timeout-close-wait=0",
            "--profiling=false",
            "--v=1",
        ],
    )
