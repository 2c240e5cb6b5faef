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
