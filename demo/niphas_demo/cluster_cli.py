"""`python -m niphas_demo.cluster_cli`: what `make demo-cluster` runs.

    python -m niphas_demo.cluster_cli [--state-dir DIR] [--ci] [--keep-running] [--result FILE]

Starts the real node (`niphas_cluster`) unless one runs, installs the platform as pods (the
`node` overlay), then tells the demo's story against it: push v1 and v2 through the eval
Service, each served by the operator's pods over HTTP, `niphas rollback`, the timeline of each
push. The node is stopped at the end (unless it was already running, or `--keep-running`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from rich.console import Console

from niphas_cluster.layout import Layout
from niphas_cluster.node import down, up
from niphas_cluster.processes import NodeStartError, running
from niphas_common.settings import default_state_dir
from niphas_demo.cli import checklist
from niphas_demo.flow import dump_outcome
from niphas_demo.on_cluster import ClusterDemo


async def story(demo: ClusterDemo) -> None:
    console = demo.console
    done = checklist(console)

    demo.prepare_cluster()
    done(f"forge serving the sample repository at {demo.repo.url if demo.repo else '?'}")
    with console.status("installing the platform: Secrets, overlays/node, every pod Ready"):
        # A collector the pods can reach: each push is then one trace across the pods.
        await demo.start_cluster(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    done("platform Ready: NATS, eval, builder, operator, cache, csi and mesh as pods")
    results = []
    for version in ("v1", "v2"):
        with console.status(f"push {version}: webhook -> eval pod -> build Job -> cache"):
            result = await demo.push(version)
        done(f"push {version}: built {result.store_path}")
        with console.status(f"{version}: operator's Deployment, kubelet mounts via the csi pod"):
            _, page = await demo.serving(version)
        demo.outcome.served.append((version, page.strip()))
        done(f"{version} answers from a pod: {page.strip()}")
        results.append(result)
    console.print("  $ niphas rollback web\n  " + demo.niphas("rollback", "web"))
    _, page = await demo.serving("v1")
    demo.outcome.served.append(("rollback", page.strip()))
    done(f"after rollback: {page.strip()}")
    for result in results:
        await demo.fill_timeline(result)
        demo.print_timeline(result)


def main() -> None:
    summary = __doc__.splitlines()[0]
    parser = argparse.ArgumentParser(prog="niphas-demo-cluster", description=summary)
    parser.add_argument("--state-dir", type=Path, default=None)
    parser.add_argument("--ci", action="store_true", help="plain output, no live progress")
    parser.add_argument("--keep-running", action="store_true", help="leave the node running")
    parser.add_argument("--result", type=Path, default=None, help="write the outcome as JSON")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("the cluster demo starts a Kubernetes node: run it as root")
    state = ((args.state_dir or default_state_dir()) / "cluster-demo").resolve()
    console = Console(
        force_terminal=False if args.ci else None, no_color=args.ci, width=120 if args.ci else None
    )
    layout = Layout()
    started_here = not running(layout)
    code = 0
    try:
        node = up(layout, log=console.print) if started_here else None
        kubeconfig = node.kubeconfig if node else layout.admin_kubeconfig
        demo = ClusterDemo(state, console, kubeconfig)
        try:
            asyncio.run(_run(demo))
        finally:
            if args.result is not None:
                dump_outcome(demo.outcome, args.result)
    except (RuntimeError, TimeoutError, NodeStartError) as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        code = 1
    except KeyboardInterrupt:
        code = 130
    finally:
        if started_here and not args.keep_running:
            down(layout, log=console.print)
        elif args.keep_running:
            console.print(f"the node keeps running: export KUBECONFIG={layout.admin_kubeconfig}")
    sys.exit(code)


async def _run(demo: ClusterDemo) -> None:
    try:
        await story(demo)
    finally:
        await demo.close()


if __name__ == "__main__":
    main()
