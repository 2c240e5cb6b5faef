"""`python -m niphas_chaos`: what `make chaos` runs.

    python -m niphas_chaos [--pushes 50] [--kills 15] [--nats-restarts 1] [--state-dir DIR]

Starts the demo's stack in a fresh state dir (a temporary one unless `--state-dir`), sends the
pushes over time while services are SIGKILLed at random and NATS restarts, waits for
quiescence, checks that nothing was lost or built twice and prints the summary. Exits 1 on any
loss, duplicate build, stuck consumer, dead letter or corrupt store.
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

from niphas_chaos.report import summary
from niphas_chaos.soak import Options, Soak
from niphas_demo.stack import unmount_below


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="niphas-chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--pushes", type=int, default=50)
    parser.add_argument("--kills", type=int, default=None, help="default: a third of --pushes")
    parser.add_argument("--nats-restarts", type=int, default=1)
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
    return parser.parse_args(argv)  # fmt: skip


def main() -> None:
    args = parse()
    if os.geteuid() != 0:
        sys.exit("the soak mounts closures and runs Nix as root: run it as root")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    kills = args.kills if args.kills is not None else max(1, args.pushes // 3)
    options = Options(
        args.pushes, kills, args.nats_restarts, args.interval_s, seed, args.quiesce_timeout_s,
        args.verify_host_all,
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
    sys.exit(1 if outcome.failed else 0)
