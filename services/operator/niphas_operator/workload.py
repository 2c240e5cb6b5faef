"""The NiphasWorkload resource as the operator reads it: typed views of spec and status.

The API server has already validated the object against the CRD's schema; these models only
give the operator typed access (unknown fields are kept by the server, ignored here).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from niphas_common.flakeref import ref_of

GROUP: Final = "niphas.io"
VERSION: Final = "v1alpha1"
KIND: Final = "NiphasWorkload"
PLURAL: Final = "niphasworkloads"
API_VERSION: Final = f"{GROUP}/{VERSION}"
FINALIZER: Final = "niphas.io/cleanup"
MANAGED_BY: Final = "niphas-operator"
NAME_LABEL: Final = "niphas.io/workload"

ARCH_LABEL: Final = "kubernetes.io/arch"
"""The node label an architecture's pods select (set by every kubelet)."""
ARCH_POD_LABEL: Final = "niphas.io/architecture"
"""Label of a multi-architecture workload's pods: which of its Deployments they belong to."""
ARCHITECTURE_SYSTEMS: Final = {
    "amd64": "x86_64-linux",
    "arm64": "aarch64-linux",
    "arm": "armv7l-linux",
    "386": "i686-linux",
    "riscv64": "riscv64-linux",
    "ppc64le": "powerpc64le-linux",
    "s390x": "s390x-linux",
}
"""Kubernetes architecture (`kubernetes.io/arch`) -> the Nix system whose build its pods run."""

CONDITION_TYPES: Final = (
    "Evaluated",
    "Built",
    "ClosureAvailable",
    "Progressing",
    "Available",
    "Degraded",
    "Schedulable",
    "Valid",
)


class _Camel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )


class ServicePort(_Camel):
    name: str | None = None
    port: int
    target_port: int | str | None = None
    protocol: str | None = None


class ServiceSpec(_Camel):
    type: str = "ClusterIP"
    ports: tuple[ServicePort, ...]


class IngressSpec(_Camel):
    host: str
    port: int
    path: str = "/"
    path_type: str = "Prefix"
    class_name: str | None = None
    tls_secret_name: str | None = None
    annotations: dict[str, str] = Field(default_factory=dict)


class BinaryCache(_Camel):
    url: str
    public_key: str | None = None


class WorkloadSpec(_Camel):
    flake_ref: str
    attribute: str
    revision: str | None = None
    ref: str | None = None
    store_path: str | None = None
    replicas: int = 1
    command: tuple[str, ...] | None = None
    args: tuple[str, ...] | None = None
    env: tuple[dict[str, Any], ...] = ()
    ports: tuple[dict[str, Any], ...] = ()
    resources: dict[str, Any] | None = None
    liveness_probe: dict[str, Any] | None = None
    readiness_probe: dict[str, Any] | None = None
    startup_probe: dict[str, Any] | None = None
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()
    affinity: dict[str, Any] | None = None
    service_account_name: str | None = None
    service: ServiceSpec | None = None
    history_limit: int = 10
    ingress: IngressSpec | None = None
    extra_volumes: tuple[dict[str, Any], ...] = ()
    extra_volume_mounts: tuple[dict[str, Any], ...] = ()
    binary_cache: BinaryCache | None = None
    architectures: tuple[str, ...] = ()


class HistoryEntry(_Camel):
    revision: int
    store_path: str
    commit: str | None = None
    main_program: str | None = None
    time: str | None = None


class ArchitectureStatus(_Camel):
    """What one architecture of a multi-architecture workload runs."""

    architecture: str
    system: str
    store_path: str | None = None
    commit: str | None = None
    main_program: str | None = None
    evaluated_out_path: str | None = None
    ready_replicas: int = 0


class WorkloadStatus(_Camel):
    observed_generation: int | None = None
    phase: str | None = None
    store_path: str | None = None
    commit: str | None = None
    main_program: str | None = None
    requested_generation: int | None = None
    history: tuple[HistoryEntry, ...] = ()
    conditions: tuple[dict[str, Any], ...] = ()
    architectures: tuple[ArchitectureStatus, ...] = ()


class Workload:
    """One NiphasWorkload object: its raw dict plus typed spec and status."""

    def __init__(self, obj: dict[str, Any]) -> None:
        self.obj = obj
        meta = obj["metadata"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.uid: str = meta["uid"]
        self.generation: int = meta.get("generation", 1)
        self.resource_version: str = meta.get("resourceVersion", "")
        self.deleting = meta.get("deletionTimestamp") is not None
        self.finalizers: list[str] = list(meta.get("finalizers") or [])
        self.spec = WorkloadSpec.model_validate(obj.get("spec") or {})
        self.status = WorkloadStatus.model_validate(obj.get("status") or {})

    @property
    def ref(self) -> str | None:
        """The ref it follows: `spec.ref`, else the flakeRef's `?ref=`; None: the default
        branch."""
        return self.spec.ref or ref_of(self.spec.flake_ref)

    @property
    def attribute_name(self) -> str:
        """The attribute's own name: `default` of `packages.x86_64-linux.default`."""
        return self.spec.attribute.rsplit(".", 1)[-1]

    @property
    def attribute_system(self) -> str | None:
        """The system a dotted attribute names (`packages.<system>.<name>`), else None."""
        parts = self.spec.attribute.split(".")
        if len(parts) == 3 and parts[0] in ("packages", "legacyPackages", "apps"):
            return parts[1]
        return None

    def architecture_entries(self) -> list[ArchitectureStatus]:
        """One entry per `spec.architectures`, in its order, with what status holds."""
        stored = {a.architecture: a for a in self.status.architectures}
        return [
            stored.get(arch)
            or ArchitectureStatus(architecture=arch, system=ARCHITECTURE_SYSTEMS[arch])
            for arch in self.spec.architectures
        ]

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def owner_reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def labels(self) -> dict[str, str]:
        return {
            "app.kubernetes.io/name": self.name,
            "app.kubernetes.io/managed-by": MANAGED_BY,
            NAME_LABEL: self.name,
        }

    def selector(self) -> dict[str, str]:
        return {NAME_LABEL: self.name}


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def short_store_path(store_path: str) -> str:
    """`/nix/store/abcdefgh...-hello-2.12` -> `abcdefg-hello-2.12` for the printer column."""
    base = store_path.rsplit("/", 1)[-1]
    digest, _, name = base.partition("-")
    return f"{digest[:7]}-{name}"


def program_of(store_path: str) -> str:
    """The program name Nix's `lib.getExe` falls back to: the store name without version
    (`builtins.parseDrvName`: the version starts at the first `-` followed by a digit)."""
    name = store_path.rsplit("/", 1)[-1].partition("-")[2]
    parts = name.split("-")
    for i in range(1, len(parts)):
        if parts[i][:1].isdigit():
            return "-".join(parts[:i])
    return name
