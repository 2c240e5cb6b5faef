"""Cluster DNS for the node: dnsmasq on the gateway address answering from hosts files that
a small loop keeps in step with the API's Services and Endpoints (no upstream: a name outside
the cluster does not resolve, and nothing is asked of another server).

Records, as CoreDNS's kubernetes plugin makes them: `<svc>.<ns>.svc.cluster.local` -> the
ClusterIP, or for a headless Service its ready endpoints' addresses, and
`<hostname>.<svc>.<ns>.svc.cluster.local` for endpoints with a hostname (StatefulSet pods).
"""

from __future__ import annotations

import json
import shutil
import ssl
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from .layout import CLUSTER_DOMAIN, GATEWAY, Layout
from .processes import spawn

SYNC_INTERVAL_S = 1.0


def start_dns(layout: Layout, server: str, ca_file: Path, token: str) -> None:
    hosts = layout.work / "dns"
    hosts.mkdir(parents=True, exist_ok=True)
    dnsmasq = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    spawn(
        layout,
        "dnsmasq",
        [
            dnsmasq, "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll",
            f"--listen-address={GATEWAY}", "--bind-interfaces", "--port=53",
            f"--hostsdir={hosts}", "--local-ttl=1", "--no-negcache",
            f"--local=/{CLUSTER_DOMAIN}/", f"--pid-file={layout.work / 'dnsmasq.pid'}",
            "--user=root",
        ],
    )  # fmt: skip
    (layout.work / "dns.token").write_text(token)
    spawn(
        layout,
        "dns-sync",
        [
            sys.executable, "-m", "niphas_cluster.dns", server, str(ca_file),
            str(layout.work / "dns.token"), str(hosts / "cluster.hosts"),
        ],
    )  # fmt: skip


def records(services: list[dict[str, Any]], endpoints: list[dict[str, Any]]) -> list[str]:
    """hosts-file lines for the given Services and Endpoints."""
    by_key = {(e["metadata"]["namespace"], e["metadata"]["name"]): e for e in endpoints}
    lines: list[str] = []
    for svc in services:
        ns, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
        fqdn = f"{name}.{ns}.svc.{CLUSTER_DOMAIN}"
        ip = svc["spec"].get("clusterIP")
        subsets = by_key.get((ns, name), {}).get("subsets") or []
        addresses = [a for s in subsets for a in s.get("addresses") or []]
        if ip and ip != "None":
            lines.append(f"{ip} {fqdn}")
        else:
            lines += [f"{a['ip']} {fqdn}" for a in addresses]
        lines += [f"{a['ip']} {a['hostname']}.{fqdn}" for a in addresses if a.get("hostname")]
    return sorted(set(lines))


def _get(server: str, context: ssl.SSLContext, token: str, path: str) -> list[dict[str, Any]]:
    request = urllib.request.Request(server + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5, context=context) as response:
        items: list[dict[str, Any]] = json.load(response)["items"]
        return items


def sync_forever(server: str, ca_file: Path, token_file: Path, out: Path) -> None:
    context = ssl.create_default_context(cafile=str(ca_file))
    token = token_file.read_text().strip()
    written = None
    while True:
        try:
            text = "\n".join(
                records(
                    _get(server, context, token, "/api/v1/services"),
                    _get(server, context, token, "/api/v1/endpoints"),
                )
            )
        except OSError as exc:
            print(f"dns-sync: {exc}", file=sys.stderr, flush=True)
        else:
            if text != written:
                tmp = out.with_suffix(".tmp")
                tmp.write_text(text + "\n")
                tmp.replace(out)  # dnsmasq re-reads a changed file in --hostsdir
                written = text
        time.sleep(SYNC_INTERVAL_S)


if __name__ == "__main__":
    sync_forever(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
