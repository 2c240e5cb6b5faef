"""The kubelet: CRI through the node's containerd, cgroupfs (no systemd here), named and
serving on loopback, no image garbage collection (images cannot be pulled again offline)."""

from __future__ import annotations

from .layout import CLUSTER_DOMAIN, GATEWAY, KUBELET_PORT, NODE_NAME, Layout, kube_cache
from .processes import spawn


def start_kubelet(layout: Layout) -> None:
    work = layout.work
    # An empty resolv.conf: pods get no upstream name server to reach out to.
    (work / "resolv.conf").write_text("")
    layout.kubelet_root.mkdir(parents=True, exist_ok=True)
    spawn(
        layout,
        "kubelet",
        [
            str(kube_cache() / "kubelet"),
            f"--kubeconfig={work / 'kubelet.kubeconfig'}",
            "--container-runtime=remote",
            f"--container-runtime-endpoint=unix://{layout.containerd_socket}",
            "--runtime-request-timeout=5m",
            "--cgroup-driver=cgroupfs",
            f"--root-dir={layout.kubelet_root}",
            f"--cert-dir={work / 'kubelet-pki'}",
            f"--hostname-override={NODE_NAME}",
            # Nothing can lower an OOM score on this VM (no CAP_SYS_RESOURCE).
            "--oom-score-adj=0",
            "--fail-swap-on=false",
            "--address=127.0.0.1",
            f"--port={KUBELET_PORT}",
            "--read-only-port=0",
            "--healthz-bind-address=127.0.0.1",
            "--healthz-port=0",
            # Only the apiserver on loopback calls the kubelet's API (logs, exec).
            "--anonymous-auth=true",
            "--authorization-mode=AlwaysAllow",
            f"--resolv-conf={work / 'resolv.conf'}",
            f"--cluster-domain={CLUSTER_DOMAIN}",
            # The node's dnsmasq (dns.py) on the gateway: cluster names only.
            f"--cluster-dns={GATEWAY}",
            "--eviction-hard=memory.available<100Mi,nodefs.available<1%,imagefs.available<1%",
            "--image-gc-high-threshold=100",
            "--image-gc-low-threshold=99",
            f"--volume-plugin-dir={work / 'volume-plugins'}",
            "--serialize-image-pulls=false",
            "--v=1",
        ],
    )
