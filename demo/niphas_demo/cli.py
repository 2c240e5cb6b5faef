"""`python -m niphas_demo`: what `make demo` runs.

    python -m niphas_demo [--state-dir DIR] [--ci] [--keep-running] [--result FILE]

`--ci` prints plain lines (no live progress) for logs and tests; `--keep-running` leaves the
app and the stack up after the story until Ctrl-C; `--result` writes what happened as JSON.
Ctrl-C, SIGTERM (`kill`, a CI timeout) or SIGHUP (the terminal closed) at any moment stops the
app, unpublishes its volume and stops `niphas up`. A run after one that died without that
(SIGKILL, a crash) first stops what it left and unmounts below the state directory
(leftovers.py); a run while another demo uses the state directory says so in one line.
Printed lines are never wrapped, so a command copied from the terminal or a log stays whole.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from niphas_common.settings import default_state_dir
from niphas_demo.flow import Demo, dump_outcome
from niphas_demo.kubelet import Kubelet
from niphas_demo.leftovers import StateInUse, clear, demo_lock

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Stopped(Exception):
    """A stop signal other than Ctrl-C arrived; the story stopped everything it started."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


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


async def until_stopped(demo: Demo, keep_running: bool) -> None:
    """The story, cancelled (so its clean-up runs) by SIGTERM or SIGHUP as by Ctrl-C."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[int] = []

    def stop(signum: int) -> None:
        if received:
            return  # already stopping
        received.append(signum)
        if signum == signal.SIGHUP:  # the terminal is gone: printing to it would fail
            demo.console.file = open(os.devnull, "w")  # noqa: SIM115 (lives with the console)
        task.cancel()

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop, signum)
    try:
        await story(demo, keep_running)
    except asyncio.CancelledError:
        if received:
            raise Stopped(received[0]) from None
        raise
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)


def main() -> None:
    parser = argparse.ArgumentParser(prog="niphas-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, default=None)
    parser.add_argument("--ci", action="store_true", help="plain output, no live progress")
    parser.add_argument("--keep-running", action="store_true")
    parser.add_argument("--result", type=Path, default=None, help="write the outcome as JSON")
    parser.add_argument(
        "--nats-cluster",
        type=int,
        default=None,
        metavar="N",
        help="run the embedded NATS as a JetStream cluster of N servers with N replicas "
        "(sets NIPHAS_NATS_CLUSTER_SIZE for `niphas up`)",
    )
    args = parser.parse_args()
    if args.nats_cluster is not None:
        os.environ["NIPHAS_NATS_CLUSTER_SIZE"] = str(args.nats_cluster)
    if os.geteuid() != 0:
        sys.exit("the demo mounts closures and runs Nix as root: run it as root")
    state = (args.state_dir or default_state_dir()).resolve()
    console = Console(
        force_terminal=False if args.ci else None,
        no_color=args.ci,
        width=120 if args.ci else None,
        soft_wrap=True,
    )
    demo = Demo(state, console)
    code = 0
    try:
        with demo_lock(state):
            for line in clear(state):
                console.print(f"recovered from an earlier run: {line}", markup=False)
            asyncio.run(until_stopped(demo, args.keep_running))
    except StateInUse as exc:
        console.print(str(exc), markup=False)
        code = 1
    except KeyboardInterrupt:
        console.print("interrupted: stopped the app, unpublished its volume, stopped niphas up")
        code = 130
    except Stopped as exc:
        console.print(f"{exc}: stopped the app, unpublished its volume, stopped niphas up")
        code = 128 + exc.signum
    except (RuntimeError, TimeoutError) as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        code = 1
    finally:
        if args.result is not None:
            dump_outcome(demo.outcome, args.result)
    with contextlib.suppress(Exception):
        console.print(f"[bold]done[/bold] in {time.monotonic() - demo._started:.0f}s")
    sys.exit(code)
