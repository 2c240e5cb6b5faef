"""Why an uploaded path may be signed, decided from content alone.

The builder need not hold a job's `.drv` (the eval worker instantiated it in its own store),
and the pod is not believed. An upload is vouched for when it is one of:

1. **a derivation**: a `.drv` whose store path is the text path of its bytes and its
   references (`makeTextPath`), and whose references are the input derivations and sources
   it names;
2. **a source**: a path whose store path is the `source` path of its NarHash (recomputed
   from the bytes) and its references: what `builtins.path`, `fetchGit`, flake inputs and
   recursive sha256 fixed-output derivations produce;
3. **an output** of a derivation in the job's derivation closure: walked from the job's
   `drv_path` (from eval.done, which the pod cannot choose) through input derivations, each
   either verified as in 1. or already in the cache under our signature.

Nothing else is signed. Derivations and sources prove themselves; an output path proves
nothing about its bytes, so it is only accepted where the verified closure names it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from niphas_common.nix.content_address import text_path
from niphas_common.nix.content_proof import is_source
from niphas_common.nix.derivation import Derivation, DerivationError, parse_derivation
from niphas_common.nix.store_path import StorePath

from .verify import Upload, UploadRefused

DrvLoader = Callable[[StorePath], Awaitable[Derivation | None]]
"""A derivation the cache already holds (signed by us), or None when it does not."""


@dataclass
class Vouched:
    """The uploads by what vouches for them."""

    drvs: dict[str, Derivation] = field(default_factory=dict)
    sources: set[str] = field(default_factory=set)
    outputs: set[str] = field(default_factory=set)


def derivation_of(path: StorePath, contents: bytes | None, references: set[str]) -> Derivation:
    """The derivation in a `.drv` whose path is the text path of `contents` and
    `references`; UploadRefused otherwise."""
    if contents is None:
        raise UploadRefused(f"{path}: a .drv must be one regular file")
    expected = text_path(path.name, contents, references, path.store_dir)
    if expected != path:
        raise UploadRefused(
            f"{path}: a .drv whose contents and references hash to {expected}, not to its path"
        )
    try:
        drv = parse_derivation(contents, path.store_dir)
    except DerivationError as exc:
        raise UploadRefused(f"{path}: not a derivation: {exc}") from exc
    if {str(r) for r in drv.references} != references:
        raise UploadRefused(f"{path}: its references are not the inputs it names")
    return drv


async def vouch(
    top: str,
    uploads: Mapping[str, Upload],
    texts: Mapping[str, bytes],
    known_outputs: frozenset[str] | None,
    load: DrvLoader,
) -> Vouched:
    """Classify every upload (NARs already verified; `texts` holds the `.drv` contents) or
    raise UploadRefused naming the first path nothing vouches for. `known_outputs`: the
    closure's outputs when the builder read them from its own store."""
    vouched = Vouched()
    candidates: list[str] = []
    for path, upload in sorted(uploads.items()):
        sp = upload.info.store_path
        if known_outputs is not None and path in known_outputs:
            vouched.outputs.add(path)
        elif sp.is_derivation:
            refs = {str(r) for r in upload.info.references}
            vouched.drvs[path] = derivation_of(sp, texts.get(path), refs)
        elif is_source(upload.info):
            vouched.sources.add(path)
        else:
            candidates.append(path)
    if candidates:
        if known_outputs is not None:
            raise _not_vouched(candidates[0], top)
        produced = await closure_outputs(top, vouched.drvs, load, set(candidates))
        for path in candidates:
            if path not in produced:
                raise _not_vouched(path, top)
        vouched.outputs.update(candidates)
    return vouched


def _not_vouched(path: str, top: str) -> UploadRefused:
    return UploadRefused(
        f"{path} is not an output of this build or its dependencies (derivations reachable "
        f"from {top}), nor a .drv or source whose content matches its path"
    )


async def closure_outputs(
    top: str, drvs: Mapping[str, Derivation], load: DrvLoader, wanted: set[str]
) -> set[str]:
    """Output paths of the derivations reachable from `top`, each verified (uploaded and
    checked, or in the cache); the walk stops once every `wanted` path is found."""
    produced: set[str] = set()
    seen, queue = {top}, [top]
    while queue and not wanted <= produced:
        path = queue.pop()
        drv = drvs.get(path) or await load(StorePath.parse(path))
        if drv is None:
            if path == top:
                raise UploadRefused(
                    f"{top}, this job's derivation, was neither uploaded nor in the cache: "
                    f"nothing vouches for {sorted(wanted)[0]}"
                )
            continue  # not available: its outputs stay unvouched
        produced |= {str(p) for p in drv.output_paths}
        for dep in map(str, drv.input_drvs):
            if dep not in seen:
                seen.add(dep)
                queue.append(dep)
    return produced
