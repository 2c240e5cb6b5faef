"""The mesh agent's settings (environment `NIPHAS_MESH_...`, or `niphas mesh` flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field
from pydantic_settings import SettingsConfigDict

from niphas_common.settings import ServiceSettings

from .upload_slots import DEFAULT_LIMIT
from .workload_caches import check_entries


class MeshSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="NIPHAS_MESH_", extra="ignore", populate_by_name=True
    )
    default_metrics_host: ClassVar[str] = "127.0.0.1"
    """A separate ops server stays on the node's loopback unless told otherwise; the cache
    port serves the same routes anyway."""

    role: Literal["node", "cache"] = Field(
        default="node",
        description="`node`: this node's agent (its store, peers, NATS). `cache`: the cluster's "
        "binary cache: serve only `cache_dir` and accept signed uploads over HTTP PUT (no store, "
        "no NATS)",
    )
    node: str = Field(
        default="local",
        pattern=r"^[a-z0-9]([a-z0-9.\-]{0,251}[a-z0-9])?$",
        description="This node's name (the Kubernetes node name): wants for it are answered here",
    )
    listen: str = Field(
        default="127.0.0.1:5480", description="HOST:PORT the binary cache listens on"
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        default="uvloop",
        description="The event loop `niphas mesh` runs on: `uvloop` (libuv; ~20% less CPU per "
        "binary cache request than asyncio's own, bench/bench_mesh.py) or `asyncio`",
    )
    public_url: str | None = Field(
        default=None,
        description="URL peers reach this agent at (announced as holder_url); "
        "None: http://<listen>",
    )
    store_root: str = Field(
        default="",
        description="Empty: the host's Nix store. Otherwise a chroot store rooted here "
        "(paths stay /nix/store/..., files live under <store_root>/nix/store)",
    )
    cache_dir: Path | None = Field(
        default=None,
        description="A file:// binary cache directory also served over HTTP (the builder's "
        "cache in the embedded default); None: <state_dir>/cache when it exists (role cache: "
        "the directory served and written; None: <state_dir>/cache)",
    )
    upload_token_file: Path | None = Field(
        default=None,
        description="Role cache: file holding the token uploads must present (HTTP basic auth "
        "password, as nix sends it from a netrc-file); None, missing or empty: uploads get 503",
    )
    upload_max_nar_bytes: int = Field(
        default=16 << 30, ge=1, description="Role cache: largest NAR file (bytes) accepted"
    )
    fallback_caches: str = Field(
        default="",
        description="Space-separated binary cache URLs tried after every announced holder "
        "(e.g. the builder's cache when it does not announce on path.available)",
    )
    workload_caches: Annotated[str, AfterValidator(check_entries)] = Field(
        default="",
        description="Space-separated binary cache URLs (exact), or URL prefixes ending in `/`, "
        "that a workload may name (NiphasWorkload spec.binaryCache, passed in its want); a want "
        "naming any other fails at once. Empty: none. What they serve is verified like "
        "everything else (signed by a trusted key, or a source)",
    )
    trusted_public_keys: str = Field(
        default="",
        description="Space-separated Nix public keys (name:base64); a fetched narinfo must carry "
        "a valid signature by one of them, and only paths signed by one are served and announced",
    )
    priority: int = Field(
        default=30, ge=0, description="Priority in nix-cache-info (lower is preferred by Nix)"
    )
    nar_compression: str = Field(
        default="none",
        pattern="^(none|zstd)$",
        description="How NARs are served: `none` (fastest on a LAN, never compressed on the hot "
        "path) or `zstd`",
    )
    fetch_concurrency: int = Field(
        default=8, ge=1, le=256, description="NAR downloads in flight at once per node"
    )
    stall_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Seconds without a byte from a holder before it is abandoned for the next",
    )
    connect_timeout_s: float = Field(
        default=5.0, gt=0, description="Seconds to connect to a holder"
    )
    peer_wait_s: float = Field(
        default=30.0,
        ge=0,
        description="Seconds to wait for a peer that announced it is fetching a path (and "
        "started first) before fetching it from the cache ourselves",
    )
    upload_slots: int = Field(
        default=DEFAULT_LIMIT,
        ge=0,
        description="Peers this node uploads NARs to at once; one more gets 503 with "
        "Retry-After and asks another holder (0: no limit; Nix clients, HEAD requests and "
        "narinfos are always served)",
    )
    range_min_bytes: int = Field(
        default=64 << 20,
        ge=1,
        description="NARs at least this large that two or more peers hold are fetched in byte "
        "ranges from several peers at once (verified over the whole, in order)",
    )
    range_bytes: int = Field(
        default=16 << 20, ge=1, description="Bytes per range of a NAR fetched from several peers"
    )
    node_ttl_s: float = Field(
        default=90.0,
        gt=0,
        description="Seconds a node's record of its URL counts without being rewritten (its "
        "agent rewrites it every third of this); a node silent longer is not fetched from",
    )
    departed_after_s: float = Field(
        default=3600.0,
        gt=0,
        description="Seconds after a node stopped or went silent before its holder records are "
        "deleted (by the first serving node by name); it re-announces what it holds if it "
        "comes back",
    )
    rescan_interval_s: float = Field(
        default=30.0,
        gt=0,
        description="Seconds between scans of the store for paths gained or lost outside the "
        "agent (local builds, nix-collect-garbage); they are announced or withdrawn",
    )
    gc_high_percent: float = Field(
        default=85.0,
        gt=0,
        le=100,
        description="Percent of the store's file system in use above which GC starts",
    )
    gc_low_percent: float = Field(
        default=70.0,
        ge=0,
        le=100,
        description="Percent of the store's file system in use GC frees down to",
    )
    gc_interval_s: float = Field(
        default=60.0, gt=0, description="Seconds between disk usage checks"
    )

    @property
    def url(self) -> str:
        return (self.public_url or f"http://{self.listen}").rstrip("/")

    @property
    def node_state_dir(self) -> Path:
        return self.state_dir / "mesh" / self.node

    @property
    def effective_cache_dir(self) -> Path | None:
        if self.cache_dir is not None:
            return self.cache_dir
        default = self.state_dir / "cache"
        return default if default.is_dir() else None
