"""`python -m niphas_chaos`: what `make chaos` runs.

    python -m niphas_chaos [--pushes 50] [--kills 15] [--nats-restarts 1] [--state-dir DIR]
                           [--nats-cluster 3 [--partitions 1] [--partition-s 10]]

Starts the demo's stack in a fresh state dir (a temporary one unless `--state-dir`), sends the
pushes over time while services are SIGKILLed at random and NATS restarts, while the demo's
kubelet keeps publishing and unpublishing the workload's volume; waits for quiescence, checks
that nothing was lost or built twice and that no mount, lease or view is left, and prints the
summary. Exits 1 on any loss, duplicate build, stuck consumer, dead letter, corrupt store,
failed or unclear mount, or leak.

`--nats-cluster 3` runs the stack on a 3-server JetStream cluster on loopback (streams and
buckets with 3 replicas): then `--nats-restarts` SIGKILLs and restarts one server at a time,
the leader of a pipeline stream or bucket, and `--partitions` cuts one server from the others'
routes for `--partition-s` seconds (a firewall rule on loopback, removed after).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from rich.console import Console

from niphas_chaos.report import markdown, summary
from niphas_chaos.soak import Options, Soak
from niphas_demo.stack import unmount_below


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="niphas-chaos",
        description=__doc__.split("\n\n", 2)[2],  # what it does and the cluster, not the usage
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pushes", type=int, default=50)
    parser.add_argument("--kills", type=int, default=None, help="default: a third of --pushes")
    parser.add_argument(
        "--nats-restarts",
        type=int,
        default=1,
        help="NATS restarts (on a cluster: server kills, leaders first)",
    )
    parser.add_argument(
        "--nats-cluster",
        type=int,
        default=1,
        metavar="N",
        help="NATS servers: 1 (default) or a JetStream cluster of N (3)",
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=None,
        help="partitions of one server (cluster only; default 1 on a cluster)",
    )
    parser.add_argument("--partition-s", type=float, default=10.0, help="seconds a partition lasts")
    parser.add_argument(
        "--no-mounts", action="store_true", help="mount only at the end, not throughout the soak"
    )
    parser.add_argument("--interval-s", type=float, default=6.0, help="mean seconds per push")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--quiesce-timeout-s", type=float, default=600.0)
    parser.add_argument(
        "--verify-host-all",
        action="store_true",
        help="verify the whole host store, not only the soak's closures",
    )
    parser.add_argument("--state-dir", type=Path, default=None)
    parser.add_argument("--ci", action="store_true", help="plain output")
    parser.add_argument("--result", type=Path, default=None, help="write the outcome as JSON")
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        help="write the summary as Markdown (e.g. chaos/RESULTS.md)",
    )
    return parser.parse_args(argv)  # fmt: skip


def main() -> None:
    args = parse()
    if os.geteuid() != 0:
        sys.exit("the soak mounts closures and runs Nix as root: run it as root")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    kills = args.kills if args.kills is not None else max(1, args.pushes // 3)
    if not (args.nats_cluster == 1 or 3 <= args.nats_cluster <= 5):
        # 2 servers have no quorum left when one is down; streams take at most 5 replicas.
        sys.exit(f"--nats-cluster {args.nats_cluster}: 1 (one server) or 3 to 5 (a cluster)")
    clustered = args.nats_cluster > 1
    partitions = args.partitions if args.partitions is not None else int(clustered)
    if partitions and not clustered:
        sys.exit("--partitions needs a cluster (--nats-cluster 3)")
    options = Options(
        args.pushes, kills, args.nats_restarts, args.interval_s, seed, args.quiesce_timeout_s,
        args.verify_host_all, args.nats_cluster, partitions, args.partition_s,
        not args.no_mounts,
    )  # fmt: skip
    console = Console(force_terminal=False if args.ci else None, no_color=args.ci, width=140)
    console.print(f"chaos: {options}")
    with tempfile.TemporaryDirectory(prefix="niphas-chaos-") as tmp:
        state = (args.state_dir or Path(tmp) / "state").resolve()
        try:
            outcome = asyncio.run(Soak(state, console, options).run())
        except KeyboardInterrupt:
            sys.exit(130)
        finally:
            unmount_below(state)  # an interrupted run's CSI staging
    console.print(summary(outcome))
    if args.result is not None:
        args.result.write_text(json.dumps(asdict(outcome), indent=1))
    if args.report is not None:
        args.report.write_text(markdown(options, outcome))
    sys.exit(1 if outcome.failed else 0)
