"""`niphas eval` as a process, wired from its environment as `niphas up` and the Deployments
run it: a signed GitHub push to its webhook port for a local git repository ends as a
succeeded `eval.done` for that commit; /readyz reports NATS and the streams; SIGTERM drains
and exits cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
import yaml

from niphas_common.bus.bus import Bus
from tests.niphas_eval.conftest import GitRepo, eval_dones, github_push

pytestmark = pytest.mark.nix


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_niphas_eval_process_turns_a_webhook_into_eval_done(
    bus: Bus, nats_url: str, make_repo: Callable[..., GitRepo], tmp_path: Path
) -> None:
    repo = make_repo("served")
    commit = repo.commit(greeting="served by niphas eval")
    secrets = tmp_path / "webhook-secrets.yaml"
    secrets.write_text(yaml.safe_dump({repo.url: {"forge": "github", "secret": "s3cret"}}))
    port = free_port()
    env = {
        **os.environ,
        "NATS_URL": nats_url,
        "NIPHAS_STATE_DIR": str(tmp_path / "state"),
        "NIPHAS_EVAL_WEBHOOK_SECRETS_FILE": str(secrets),
        # The forge's repositories, and the busybox store path their flakes take as an input.
        "NIPHAS_EVAL_ALLOWED_REFS": f"file://{tmp_path}/forge/* path:{repo.tools.path}",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "niphas_common", "eval", "--listen", f"127.0.0.1:{port}"], env=env
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                try:
                    async with http.get(f"{base}/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert proc.poll() is None, "niphas eval exited"
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("niphas eval never became ready")
            delivery = github_push("s3cret", clone_url=repo.url, full_name="acme/served",
                                   after=commit)  # fmt: skip
            async with http.post(
                base + delivery.path, data=delivery.body, headers=delivery.headers
            ) as resp:
                assert resp.status == 202, await resp.text()

        for _ in range(600):
            dones = await eval_dones(bus)
            if dones:
                break
            await asyncio.sleep(0.05)
        [done] = dones
        assert (done.status, done.commit, done.repository) == ("succeeded", commit, repo.url)
        assert (tmp_path / "state" / "eval").is_dir()  # NIPHAS_STATE_DIR from `niphas up`
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0
