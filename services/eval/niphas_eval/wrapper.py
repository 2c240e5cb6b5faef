"""The wrapper flake: one directory per evaluation, holding a flake.nix that takes the pushed
commit as its input `target` and returns what the commit provides for one system, and the
flake.lock that pins `target` and every input of the pushed flake (see flakelock.py).

The wrapper is our own `path:` flake, trusted; the pushed code only ever runs as `target`.
Its output `result` lists, for every attribute of `packages.<system>` and of an optional
`niphas` output (`niphas.<system>` when it has the system, else `niphas` itself): drvPath,
output paths, name, system and meta.mainProgram, plus the target's locked rev and narHash; an
attribute that throws or fails an assertion fails alone (`builtins.tryEval`).
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

_WRAPPER = """\
{
  description = "niphas eval: what one commit of a flake provides for @SYSTEM@";
  # The pushed commit; flake.lock beside this file locks it and its checked inputs.
  inputs.target.url = @TARGET@;
  outputs = { self, target }:
    let
      system = "@SYSTEM@";
      strict = x: builtins.tryEval (builtins.deepSeq x x);
      failed = "evaluation failed (throw or assert)";
      describe = prefix: name: value:
        let
          base = { attribute = name; attrPath = "${prefix}.${name}"; };
          forced = builtins.tryEval value;
          v = forced.value;
          isDrv = forced.success && builtins.isAttrs v && (v.type or null) == "derivation";
          drvPath = strict v.drvPath;
          outputs = strict (builtins.listToAttrs
            (map (o: { name = o; value = v.${o}.outPath; }) (v.outputs or [ "out" ])));
          drvName = strict (v.name or null);
          drvSystem = strict (v.system or null);
          main = strict (v.meta.mainProgram or null);
        in
          if !forced.success then base // { error = failed; }
          else if !isDrv then base // { error = "not a derivation"; }
          else if !(drvPath.success && outputs.success) then base // { error = failed; }
          else base // {
            drvPath = drvPath.value;
            outputs = outputs.value;
            name = if drvName.success then drvName.value else null;
            system = if drvSystem.success then drvSystem.value else null;
            mainProgram =
              if main.success && builtins.isString main.value then main.value else null;
          };
      describeAll = prefix: set:
        map (name: describe prefix name set.${name}) (builtins.attrNames set);
      packages = target.packages or { };
      hasPackages = builtins.isAttrs packages && packages ? ${system}
        && builtins.isAttrs packages.${system};
      niphas = target.niphas or null;
      hasNiphas = builtins.isAttrs niphas;
      perSystem = hasNiphas && niphas ? ${system} && builtins.isAttrs niphas.${system};
    in {
      # For `#target.<attrPath>.drvPath`: one failed attribute's own error message.
      inherit target;
      result = {
        rev = target.rev or null;
        narHash = target.narHash or null;
        inherit hasPackages hasNiphas;
        attributes =
          (if hasPackages then describeAll "packages.${system}" packages.${system} else [ ])
          ++ (if perSystem then describeAll "niphas.${system}" niphas.${system}
              else if hasNiphas then describeAll "niphas" niphas
              else [ ]);
      };
    };
}
"""


def nix_string(text: str) -> str:
    """`text` as a Nix string literal (JSON's escapes, and `${` kept literal)."""
    return json.dumps(text).replace("${", "\\${")


class WrapperDir:
    """A fresh wrapper flake for one evaluation, removed afterwards (`with` block)."""

    def __init__(self, parent: Path, system: str, pinned: str, lock: dict[str, Any]) -> None:
        self.path = parent / f"eval-{system}-{uuid.uuid4().hex[:12]}"
        self.path.mkdir(parents=True)
        text = _WRAPPER.replace("@SYSTEM@", system).replace("@TARGET@", nix_string(pinned))
        (self.path / "flake.nix").write_text(text)
        (self.path / "flake.lock").write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")

    @property
    def ref(self) -> str:
        return f"path:{self.path}"

    def __enter__(self) -> WrapperDir:
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
