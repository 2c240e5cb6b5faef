"""The Nix store layer: store paths, hashes, NAR streaming, narinfo, signatures, the
binary-cache client and the one place that runs the nix CLI.

Import from the submodules (`niphas_common.nix.nar`, `...narinfo`, ...); every error raised
here is a `niphas_common.nix.errors.NixError`.
"""
