"""`python -m niphas_cluster up|down|status`: the real node of `make cluster`."""

from __future__ import annotations

import argparse
import sys

from .layout import Layout
from .node import down, up
from .processes import NodeStartError, running


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="niphas_cluster", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    layout = Layout()
    try:
        if args.command == "up":
            node = up(layout, log=lambda m: print(m, file=sys.stderr))
            print(f"export KUBECONFIG={node.kubeconfig}")
            return 0
        if args.command == "down":
            return 1 if down(layout, log=lambda m: print(m, file=sys.stderr)) else 0
    except NodeStartError as exc:
        print(f"niphas cluster: {exc}", file=sys.stderr)
        return 1
    daemons = running(layout)
    for name, pid in daemons.items():
        print(f"{name:<24} pid {pid}")
    if daemons:
        print(f"export KUBECONFIG={layout.admin_kubeconfig}")
    else:
        print("no node runs on this host")
    return 0


if __name__ == "__main__":
    sys.exit(main())
