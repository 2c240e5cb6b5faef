"""The main job with the platform itself as pods on a real node (`make demo-cluster`).

The node (`niphas_cluster`) runs the `node` overlay (the `dev` overlay with what Kubernetes
1.20 needs): NATS, eval, builder, operator, the in-cluster cache, the csi and mesh DaemonSets,
all from the platform's image, reaching each other through Services and cluster DNS and the API
with their service accounts. The demo plays the forge: a git server on the node's gateway
serves the sample repository and its tools repository (dumb HTTP), and the signed webhook goes
to the eval Service. Everything else is the platform's: evaluation in an eval worker pod, a
build Job, the cache, the mesh, the operator's Deployment, the kubelet mounting the closure
through the csi pod.
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import nats
from rich.console import Console

from niphas_common.nix.signing import SecretKey
from niphas_demo.flow import Demo, until
from niphas_demo.forge import GitForge
from niphas_demo.layout import NAMESPACE, WORKLOAD, secrets_yaml, workload_yaml
from niphas_demo.sample import BUSYBOX, FlakeRepo, SampleRepo

REPO_ROOT = Path(__file__).resolve().parents[2]
OVERLAY = REPO_ROOT / "deploy" / "kustomize" / "overlays" / "node"
SYSTEM = "niphas-system"
NODE_LABEL = "niphas.io/store=true"


class Kubectl:
    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig
        beside = Path(sys.executable).with_name("kubectl")
        self.binary = str(beside) if beside.exists() else shutil.which("kubectl") or "kubectl"

    def __call__(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [self.binary, "--kubeconfig", str(self.kubeconfig), *args],
            input=input, capture_output=True, text=True, check=False, timeout=timeout,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {done.stderr.strip()[-600:]}")
        return done

    def json(self, *args: str) -> dict[str, Any]:
        obj: dict[str, Any] = json.loads(self(*args, "-o", "json").stdout)
        return obj

    def apply_created(self, *create: str) -> None:
        """`kubectl create ...` made idempotent: rendered client-side, then applied."""
        manifest = self("create", *create, "--dry-run=client", "-o", "yaml").stdout
        self("apply", "-f", "-", input=manifest)

    def create_secret(self, namespace: str, name: str, **values: str) -> None:
        """Create the Secret unless it exists: a second run keeps what running pods use."""
        if self("-n", namespace, "get", "secret", name, check=False).returncode == 0:
            return
        literals = [f"--from-literal={k.replace('_', '-')}={v}" for k, v in values.items()]
        self("-n", namespace, "create", "secret", "generic", name, *literals)


def install_platform(kubectl: Kubectl, key: SecretKey, webhooks: str, allowed: str) -> None:
    """What an administrator does once: Secrets and ConfigMaps, the overlay, the node label;
    then wait until every platform pod is Ready."""
    kubectl.apply_created("namespace", SYSTEM)
    ns = ("-n", SYSTEM)
    kubectl.create_secret(SYSTEM, "niphas-nats", password=secrets.token_hex(16))
    kubectl.create_secret(SYSTEM, "niphas-cache-key", secret_key=str(key))
    kubectl.create_secret(SYSTEM, "niphas-cache-upload", token=secrets.token_hex(32))
    # The webhook secrets and the public key follow this run's (re-read by the services).
    kubectl.apply_created(*ns, "secret", "generic", "niphas-eval-webhooks",
                          f"--from-literal=secrets.yaml={webhooks}")  # fmt: skip
    public = base64.b64decode(
        kubectl.json(*ns, "get", "secret", "niphas-cache-key")["data"]["secret-key"]
    ).decode()
    public_key = SecretKey.parse(public).public_key
    kubectl.apply_created(*ns, "configmap", "niphas-cache",
                          f"--from-literal=public-key={public_key}")  # fmt: skip
    kubectl("label", "--overwrite", "node", "--all", NODE_LABEL)
    kubectl("apply", "-k", str(OVERLAY), timeout=300)
    kubectl(*ns, "patch", "configmap", "niphas-eval", "--type=merge",
            "-p", json.dumps({"data": {"allowed-refs": allowed}}))  # fmt: skip
    # A changed allowlist reaches the workers at their next start.
    kubectl(*ns, "rollout", "restart", "deployment/niphas-eval-worker")
    wait_platform_ready(kubectl)


def export_traces(kubectl: Kubectl, endpoint: str) -> None:
    """Every platform pod exports its spans to `endpoint` (OTLP/HTTP; it must be reachable
    from the pods), flushed within half a second; then wait for the rollouts."""
    kubectl("-n", SYSTEM, "set", "env", "deployment,daemonset,statefulset", "--all",
            f"OTEL_EXPORTER_OTLP_ENDPOINT={endpoint}", "OTEL_BSP_SCHEDULE_DELAY=500")  # fmt: skip
    wait_platform_ready(kubectl)


def wait_platform_ready(kubectl: Kubectl, timeout_s: int = 600) -> None:
    """Every rollout done and every replaced pod gone: a rollout counts as done while its old
    pods still terminate, and an old worker may take one more event (without the new env)."""
    for kind in ("statefulset", "deployment", "daemonset"):
        names = kubectl("-n", SYSTEM, "get", kind, "-o", "name").stdout.split()
        for name in names:
            kubectl("-n", SYSTEM, "rollout", "status", name, f"--timeout={timeout_s}s",
                    timeout=timeout_s + 30)  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while terminating := [
        pod["metadata"]["name"]
        for pod in kubectl.json("-n", SYSTEM, "get", "pods")["items"]
        if pod["metadata"].get("deletionTimestamp")
    ]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"platform pods still terminating: {', '.join(terminating)}")
        time.sleep(0.5)


def service_ip(kubectl: Kubectl, namespace: str, name: str) -> str:
    ip: str = kubectl.json("-n", namespace, "get", "service", name)["spec"]["clusterIP"]
    return ip


class ClusterDemo(Demo):
    """The demo's story against the platform running as pods."""

    def __init__(self, state: Path, console: Console, kubeconfig: Path) -> None:
        super().__init__(state, console)
        self.kubectl = Kubectl(kubeconfig)
        self.forge = GitForge(self.layout.demo / "forge")
        self.key = SecretKey.generate("niphas-cluster-1")

    def prepare_cluster(self) -> None:
        """The forge with the tools and sample repositories, the webhook secret."""
        self.layout.demo.mkdir(parents=True, exist_ok=True)
        self.secret = secrets.token_hex(16)
        self.forge.start()
        tools = FlakeRepo(self.forge.root / "tools")
        tools.ensure()
        (tools.dir / "bin").mkdir(exist_ok=True)
        shutil.copy2(BUSYBOX, tools.dir / "bin" / "busybox")
        tools.git("add", "bin/busybox")
        if not tools.git("status", "--porcelain"):
            tools.git("commit", "-q", "--allow-empty", "-m", "tools")
        else:
            tools.git("commit", "-q", "-m", "busybox")
        self.forge.publish(tools.dir)
        repo_dir = self.forge.root / "demo-web"
        tools_input = f"git+{self.forge.url(tools.dir)}?ref=main"
        self.repo = SampleRepo(repo_dir, tools_input, clone_url=self.forge.url(repo_dir))
        self.repo.ensure()

    async def start_cluster(self, otlp_endpoint: str | None = None) -> None:
        """Install the platform; with `otlp_endpoint`, every platform pod exports spans."""
        assert self.repo is not None
        # The entry pins the clone URL: the ingress evaluates it, whatever a payload says.
        entry = secrets_yaml(self.secret, clone_url=self.forge.url(self.repo.dir))
        install_platform(self.kubectl, self.key, entry, f"{self.forge.base_url}/*")
        if otlp_endpoint:
            export_traces(self.kubectl, otlp_endpoint)
        data = self.kubectl.json("-n", SYSTEM, "get", "secret", "niphas-nats")["data"]
        auth = base64.b64decode(data["password"]).decode()
        nats_ip = service_ip(self.kubectl, SYSTEM, "nats")
        self.nc = await nats.connect(
            f"nats://niphas:{auth}@{nats_ip}:4222", name="niphas-demo-cluster"
        )
        self.kubectl("apply", "-f", "-", input=workload_yaml(self.repo.flake_ref, self.ports.app))

    def webhook_url(self) -> str:
        return f"http://{service_ip(self.kubectl, SYSTEM, 'niphas-eval')}/hooks/github"

    def commit(self, version: str) -> tuple[str, str]:
        assert self.repo is not None
        before, after = self.repo.commit_version(version)
        self.forge.publish(self.repo.dir)
        return before, after

    def pods(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.kubectl.json(
            "-n", NAMESPACE, "get", "pods", "-l", f"app.kubernetes.io/name={WORKLOAD}"
        )["items"]
        return [p for p in items if not p["metadata"].get("deletionTimestamp")]

    async def serving(self, version: str, timeout_s: float = 300) -> tuple[str, str]:
        """Wait until the workload's one ready pod answers with `version`: (pod uid, page)."""
        return await serving(self.pods, self.ports.app, version, timeout_s)

    def niphas(self, *args: str) -> str:
        niphas = Path(sys.executable).with_name("niphas")
        out = subprocess.run(
            [str(niphas), *args, "--kubeconfig", str(self.kubectl.kubeconfig)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"niphas {' '.join(args)} failed: {out.stderr.strip()}")
        return out.stdout.strip()

    async def close(self) -> None:
        self.kubectl("-n", NAMESPACE, "delete", "nw", WORKLOAD, "--ignore-not-found", check=False)
        if self.nc is not None:
            await self.nc.close()
        self.forge.stop()

    def uninstall(self) -> None:
        """Remove the platform and leave the node as it was: every object of the overlay,
        waited for (its namespace goes once the csi and mesh pods are gone, so no other csi
        driver of the same name meets theirs), and the node's store label."""
        self.kubectl("delete", "-k", str(OVERLAY), "--ignore-not-found", "--wait=true",
                     "--timeout=540s", timeout=600)  # fmt: skip
        self.kubectl("label", "node", "--all", f"{NODE_LABEL.partition('=')[0]}-", check=False)


def ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


async def serving(pods: Any, port: int, version: str, timeout_s: float) -> tuple[str, str]:
    """Wait until exactly one ready pod of `pods()` answers `version` over HTTP on its pod IP."""

    async def probe() -> tuple[str, str] | None:
        live = [p for p in pods() if ready(p)]
        if len(live) != 1:
            return None
        url = f"http://{live[0]['status'].get('podIP')}:{port}/"
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response,
            ):
                page = await response.text()
        except (aiohttp.ClientError, TimeoutError):
            return None
        uid = str(live[0]["metadata"]["uid"])
        return (uid, page) if version in page else None

    return await until(f"a ready pod serving {version}", probe, timeout_s)
