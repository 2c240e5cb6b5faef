"""The event bodies, one class per subject.

Every event is frozen, forbids unknown fields and carries `schema_version`, `event_id` and
`occurred_at`. `idempotency_key` is deterministic in the event's meaning (not its own id or time,
unless the event is a state announcement): it becomes the `Nats-Msg-Id`, so publishing the same
fact twice inside the stream's duplicate window stores it once.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, ClassVar, Final, Literal, Self

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from niphas_schemas.holders import HOLDERS_BUCKET, path_key
from niphas_schemas.types import (
    AttrName,
    CommitSha,
    DrvPath,
    GitRef,
    NarHash,
    NarSize,
    NixSystem,
    NodeId,
    StorePath,
)

SCHEMA_VERSION: Final = 1
_NODE_NAME: Final = re.compile(r"[a-z0-9]([a-z0-9.\-]{0,251}[a-z0-9])?")

Forge = Literal["github", "gitea", "forgejo", "gitlab", "niphas"]
"""Where a push came from; `niphas` is the operator asking for a first evaluation."""

RepoUrl = Annotated[
    str,
    Field(
        min_length=1,
        max_length=2048,
        pattern=r"^(https?|ssh|git|file)://\S+$|^git@\S+:\S+$",
        description="The repository's clone URL (https, ssh, git, file or scp-like git@host:path)",
    ),
]

ShortText = Annotated[str, Field(max_length=65536)]
"""Free text such as an error or a log tail; bounded so one event stays small."""

PushedAt = Annotated[
    AwareDatetime | None,
    Field(
        description="When the commit was the ref's head: the push.received's occurred_at, or "
        "when the eval worker resolved the ref; orders two commits of one ref (None: unknown)"
    ),
]


def _plain_url(url: str) -> str:
    # Nodes allow workload caches by URL prefix: a '..' segment or an escape could step out.
    rest = url.split("://", 1)[1]
    if "%" in rest or any(part in (".", "..") for part in rest.split("/")):
        raise ValueError("no '.' or '..' segments and no percent-escapes")
    return url


BinaryCacheUrl = Annotated[
    str,
    Field(max_length=2048, pattern=r"^https?://[^\s?#@]+$"),
    AfterValidator(_plain_url),
]
"""An http(s) binary cache URL: no query, fragment, user info, dot segments or escapes."""

NixPublicKey = Annotated[
    str,
    Field(max_length=1024, pattern=r"^[A-Za-z0-9._+\-]+:[A-Za-z0-9+/]{43}=$"),
]
"""A Nix public key as `nix key convert-secret-to-public` prints it: name:base64 (Ed25519)."""


def _is_none(value: object) -> bool:
    return value is None


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _new_id() -> str:
    return uuid.uuid4().hex


def _digest(*parts: str) -> str:
    """A short stable digest for keys built from unbounded parts (paths, URLs)."""
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32]


class Event(BaseModel):
    """Fields every event carries."""

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_timedelta="float")

    subject: ClassVar[str]
    """The event's subject; its stream is named after it."""
    routed: ClassVar[bool] = False
    """Whether each event goes to a subject below `subject` naming its recipient
    (`routed_subject`), so a consumer can take only its own (the stream holds `subject.>`)."""
    state_bucket: ClassVar[str | None] = None
    """For an event that states something current (who holds a path): the key-value bucket
    where its `state_key` keeps the latest word, with no age limit (the event may expire)."""
    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: str = Field(
        default_factory=_new_id,
        pattern=r"^[A-Za-z0-9._:\-]{1,128}$",
        description="Unique id of this event, carried in logs and traces",
    )
    occurred_at: AwareDatetime = Field(
        default_factory=_utcnow, description="When the fact happened (timezone-aware)"
    )

    @property
    def idempotency_key(self) -> str:
        """The deterministic part of `Nats-Msg-Id`; subclasses say what makes two events equal."""
        raise NotImplementedError

    @property
    def msg_id(self) -> str:
        return f"{self.subject}:{self.idempotency_key}"

    @property
    def routed_subject(self) -> str:
        """The subject this event is published on: `subject`, or below it when `routed`."""
        return self.subject

    @property
    def state_key(self) -> str:
        """The key in `state_bucket` this event sets (only for events with a bucket)."""
        raise NotImplementedError

    @property
    def clears_state(self) -> bool:
        """Whether the event deletes its `state_key` rather than setting it."""
        return False


class PushReceived(Event):
    """A commit of a flake repository must be evaluated."""

    subject: ClassVar[str] = "push.received"
    forge: Forge
    repository: RepoUrl
    ref: GitRef | None = Field(default=None, description="The pushed ref; None: default branch")
    before: CommitSha | None = Field(default=None, description="Previous head of the ref")
    commit: CommitSha | None = Field(
        default=None, description="Commit to evaluate (the push's `after`); None: the ref's head"
    )
    pusher: str | None = Field(default=None, max_length=255)
    delivery_id: str = Field(
        min_length=1,
        max_length=255,
        description="The forge's delivery id (or the operator's request id): the idempotency key",
    )

    @property
    def idempotency_key(self) -> str:
        return f"{self.forge}:{self.delivery_id}"


class EvaluatedAttribute(BaseModel):
    """One attribute of the flake's `packages.<system>` (or `niphas`) output."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    attribute: AttrName
    attr_path: str = Field(
        max_length=1024, description="Full attribute path, e.g. packages.x86_64-linux.default"
    )
    name: str | None = Field(default=None, max_length=255, description="The derivation's name")
    system: NixSystem
    drv_path: DrvPath | None = None
    outputs: dict[str, StorePath] = Field(default_factory=dict)
    main_program: str | None = Field(default=None, max_length=255)
    error: ShortText | None = Field(default=None, description="Why this attribute failed")

    @model_validator(mode="after")
    def _evaluated_or_failed(self) -> Self:
        if self.error is None and (self.drv_path is None or not self.outputs):
            raise ValueError("an attribute without error needs drv_path and outputs")
        return self


class EvalDone(Event):
    """The flake at that commit evaluated (or failed)."""

    subject: ClassVar[str] = "eval.done"
    push_event_id: str = Field(max_length=128)
    repository: RepoUrl
    ref: GitRef | None = Field(default=None, description="The pushed ref; None: default branch")
    commit: CommitSha
    pushed_at: PushedAt = None
    locked_flake_ref: str | None = Field(default=None, max_length=4096)
    status: Literal["succeeded", "failed"]
    attributes: tuple[EvaluatedAttribute, ...] = ()
    error: ShortText | None = Field(default=None, description="Why the evaluation failed")

    @model_validator(mode="after")
    def _failure_has_reason(self) -> Self:
        if self.status == "failed" and not self.error:
            raise ValueError("a failed evaluation needs an error")
        return self

    @property
    def idempotency_key(self) -> str:
        # Per push: one commit pushed to two refs (or twice to one) is evaluated once, but each
        # push gets its own eval.done; a redelivered push publishes the same one again.
        return f"{_digest(self.repository, self.push_event_id)}:{self.commit}:{self.status}"


class BuiltOutput(BaseModel):
    """One realised output of a derivation, as the binary cache holds it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$", description="Output name, e.g. out")
    path: StorePath
    nar_hash: NarHash
    nar_size: NarSize
    references: tuple[StorePath, ...] = ()


class BuildDone(Event):
    """A derivation was realised (or failed, or was already cached)."""

    subject: ClassVar[str] = "build.done"
    eval_event_id: str = Field(max_length=128)
    repository: RepoUrl
    ref: GitRef | None = Field(
        default=None, description="The evaluated push's ref (from eval.done); None: default branch"
    )
    commit: CommitSha
    pushed_at: PushedAt = None
    attribute: AttrName
    drv_path: DrvPath
    status: Literal["built", "cached", "failed"]
    outputs: tuple[BuiltOutput, ...] = ()
    closure: tuple[StorePath, ...] = Field(
        default=(), description="Every store path in the closure of the outputs"
    )
    cache_url: str | None = Field(default=None, max_length=2048)
    built_on: str | None = Field(default=None, max_length=255, description="Builder or Job name")
    duration_s: float = Field(default=0.0, ge=0)
    log_tail: ShortText | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.status == "failed":
            if not self.log_tail:
                raise ValueError("a failed build needs a log_tail")
        elif not self.outputs:
            raise ValueError(f"a {self.status} build needs outputs")
        return self

    @property
    def idempotency_key(self) -> str:
        # Per evaluation: a derivation is built once, but every eval.done naming it (each push
        # of its commit) gets its own build.done; a redelivered eval.done the same one again.
        parts = (self.drv_path, self.repository, self.commit, self.attribute, self.eval_event_id)
        return f"{_digest(*parts)}:{self.status}"


class PathWanted(Event):
    """Node `node` wants the closure of `store_paths` present by `deadline`."""

    subject: ClassVar[str] = "path.wanted"
    routed: ClassVar[bool] = True
    node: NodeId
    store_paths: tuple[StorePath, ...] = Field(min_length=1, max_length=1024)
    deadline: AwareDatetime
    requester: str = Field(
        max_length=512, description="Who asks, e.g. csi:<volume id> or operator:<ns>/<name>"
    )
    # Both left out of the body when None: a want naming no cache is written as before these
    # fields existed, so an agent of the previous release (unknown fields forbidden) takes it.
    binary_cache: BinaryCacheUrl | None = Field(
        default=None,
        exclude_if=_is_none,
        description="A binary cache the workload names for this closure (its NiphasWorkload's "
        "spec.binaryCache.url): one more holder of these paths and their references, used only "
        "if the node's NIPHAS_MESH_WORKLOAD_CACHES allows it; None: the cluster's holders only",
    )
    binary_cache_public_key: NixPublicKey | None = Field(
        default=None,
        exclude_if=_is_none,
        description="The key the workload says that cache signs with; the want fails unless "
        "the node already trusts it (NIPHAS_MESH_TRUSTED_PUBLIC_KEYS)",
    )

    @model_validator(mode="after")
    def _key_with_cache(self) -> Self:
        if self.binary_cache_public_key is not None and self.binary_cache is None:
            raise ValueError("binary_cache_public_key needs binary_cache")
        return self

    @property
    def idempotency_key(self) -> str:
        cache = (self.binary_cache or "", self.binary_cache_public_key or "")
        parts = (*cache, self.requester) if any(cache) else (self.requester,)
        return f"{self.node}:{_digest(*parts, *sorted(self.store_paths))}"

    @property
    def routed_subject(self) -> str:
        """`path.wanted.<node>`: each node's agent consumes only its own wants."""
        return f"{self.subject}.{self.node}"


class PathAvailable(Event):
    """Holder H has (or is fetching, or withdrew, or failed to fetch) store path P.

    `failed` answers a `path.wanted` the holder could not satisfy by its deadline, with the
    reason in `error`, so whoever waits learns the real cause at once."""

    subject: ClassVar[str] = "path.available"
    state_bucket: ClassVar[str | None] = HOLDERS_BUCKET
    holder_kind: Literal["node", "cache"]
    holder: str = Field(max_length=255, description="Node name, or the cache's name")
    holder_url: str = Field(
        max_length=2048,
        pattern=r"^(https?|file)://\S+$",
        description="Binary cache URL to fetch from",
    )
    state: Literal["available", "fetching", "withdrawn", "failed"] = "available"
    store_path: StorePath
    nar_hash: NarHash | None = None
    nar_size: NarSize | None = None
    references: tuple[StorePath, ...] = ()
    error: ShortText | None = Field(default=None, description="Why a fetch failed")

    @model_validator(mode="after")
    def _available_has_nar(self) -> Self:
        if self.state == "available" and (self.nar_hash is None or self.nar_size is None):
            raise ValueError("an available path needs nar_hash and nar_size")
        if self.state == "failed" and not self.error:
            raise ValueError("a failed fetch needs an error")
        if self.holder_kind == "node" and not _NODE_NAME.fullmatch(self.holder):
            raise ValueError("a node holder is named by its Kubernetes node name")
        return self

    @property
    def state_key(self) -> str:
        """`<hash>.node.<node>` or `<hash>.cache.<url digest>` (see `holders`)."""
        return path_key(self.store_path, self.holder_kind, self.holder, self.holder_url)

    @property
    def clears_state(self) -> bool:
        return self.state == "withdrawn"

    @property
    def idempotency_key(self) -> str:
        # A state announcement: the same holder may gain, lose and regain a path, so the time
        # of the announcement is part of what makes it the same event.
        stamp = self.occurred_at.isoformat()
        return f"{_digest(self.holder_url, self.store_path, stamp)}:{self.state}"


WorkloadPhase = Literal["Provisioning", "Running", "Degraded", "Failed"]
"""The phases of a workload that runs (or failed to run) a commit; see the operator's README."""


class WorkloadRolled(Event):
    """A workload's rollout of a commit reached a new phase: Provisioning (its Deployment runs
    the commit's store path, not every replica available yet), Running, Degraded or Failed.

    Published by the operator when the phase (or the commit it runs) changes, for whoever
    reports rollouts (the reporter's commit statuses); the operator knows no forge."""

    subject: ClassVar[str] = "workload.status"
    namespace: str = Field(
        pattern=r"^[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?$", description="The workload's namespace"
    )
    name: str = Field(
        pattern=r"^[a-z0-9]([a-z0-9.\-]{0,251}[a-z0-9])?$", description="The workload's name"
    )
    repository: RepoUrl
    ref: GitRef | None = Field(
        default=None, description="The ref the workload follows; None: the default branch"
    )
    commit: CommitSha
    store_path: StorePath | None = Field(
        default=None, description="What its Deployment runs (the first architecture's path)"
    )
    phase: WorkloadPhase
    reason: str = Field(
        min_length=1,
        max_length=128,
        description="One CamelCase word, as `kubectl get nw` prints it",
    )
    message: str = Field(default="", max_length=1024, description="The sentence behind it")

    @property
    def idempotency_key(self) -> str:
        # A state announcement: the same workload may leave a phase and come back to it, so the
        # time of the announcement is part of what makes it the same event.
        stamp = self.occurred_at.isoformat()
        where = f"{self.namespace}/{self.name}"
        return f"{_digest(where, self.commit, stamp)}:{self.phase}"


EVENT_TYPES: tuple[type[Event], ...] = (
    PushReceived,
    EvalDone,
    BuildDone,
    PathWanted,
    PathAvailable,
    WorkloadRolled,
)
SUBJECTS: dict[str, type[Event]] = {cls.subject: cls for cls in EVENT_TYPES}
