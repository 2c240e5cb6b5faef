"""`python -m niphas_demo`: what `make demo` runs.

    python -m niphas_demo [--state-dir DIR] [--ci] [--keep-running] [--result FILE]

`--ci` prints plain lines (no live progress) for logs and tests; `--keep-running` leaves the
app and the stack up after the story until Ctrl-C; `--result` writes what happened as JSON.
Ctrl-C at any moment stops the app, unpublishes its volume and stops `niphas up`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from niphas_common.settings import default_state_dir
from niphas_demo.flow import Demo, dump_outcome
from niphas_demo.kubelet import Kubelet


def checklist(console: Console) -> Callable[[str], None]:
    """Prints a finished step with the seconds since the story began."""
    t0 = time.monotonic()

    def done(what: str) -> None:
        console.print(f"[green]✓[/green] {what} [dim]({time.monotonic() - t0:.1f}s)[/dim]")

    return done


async def story(demo: Demo, keep_running: bool) -> None:
    console = demo.console
    done = checklist(console)

    with console.status("preparing: signing key, webhook secret, sample repository, workload"):
        env = await asyncio.to_thread(demo.prepare)
    done(f"state in {demo.layout.state}; sample repository {demo.layout.repo}")
    try:
        with console.status("starting `niphas up`: NATS JetStream and the five services"):
            await demo.start(env)
        done(f"niphas up: NATS at {demo.stack.nats_url if demo.stack else '?'}, services ready")
        async with Kubelet(demo.layout.csi_socket, demo.layout.pods) as kubelet:
            results = []
            for version in ("v1", "v2"):
                with console.status(f"push {version}: webhook -> eval -> build -> cache"):
                    result = await demo.push(version)
                done(f"push {version}: built {result.store_path}")
                with console.status(f"operator renders {version}; kubelet mounts and runs it"):
                    spec = await demo.rendered(result.store_path)
                    _, page = await demo.serve(kubelet, spec, version)
                done(f"{version} answers over HTTP from the mounted closure: {page.strip()}")
                results.append(result)
            with console.status("niphas rollback web"):
                console.print("  $ niphas rollback web\n  " + demo.niphas("rollback", "web"))
                spec = await demo.rendered(results[0].store_path)
                _, page = await demo.serve(kubelet, spec, "rollback")
            done(f"after rollback: {page.strip()}")
            for result in results:
                await demo.fill_timeline(result)
                demo.print_timeline(result)
            await demo.scrape_metrics()
            demo.print_next_steps()
            if keep_running:
                console.print("\nthe app and the stack keep running; Ctrl-C stops them")
                await asyncio.Event().wait()
    finally:
        with console.status("stopping: app, volume, niphas up"):
            await demo.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="niphas-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, default=None)
    parser.add_argument("--ci", action="store_true", help="plain output, no live progress")
    parser.add_argument("--keep-running", action="store_true")
    parser.add_argument("--result", type=Path, default=None, help="write the outcome as JSON")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("the demo mounts closures and runs Nix as root: run it as root")
    state = (args.state_dir or default_state_dir()).resolve()
    console = Console(
        force_terminal=False if args.ci else None, no_color=args.ci, width=120 if args.ci else None
    )
    demo = Demo(state, console)
    code = 0
    try:
        asyncio.run(story(demo, args.keep_running))
    except KeyboardInterrupt:
        console.print("interrupted: stopped the app, unpublished its volume, stopped niphas up")
        code = 130
    except (RuntimeError, TimeoutError) as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        code = 1
    finally:
        if args.result is not None:
            dump_outcome(demo.outcome, args.result)
    with contextlib.suppress(Exception):
        console.print(f"[bold]done[/bold] in {time.monotonic() - demo._started:.0f}s")
    sys.exit(code)
