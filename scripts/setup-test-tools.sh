#!/usr/bin/env bash
# Debian packages the test suite uses besides Nix and the apiserver (idempotent, root):
# git (the forge repositories of the eval and demo tests), GNU time (peak RSS of nix
# processes in tests/faults), util-linux (unshare, prlimit, setpriv for the CSI tests).
set -euo pipefail
need=()
for pkg in git time util-linux; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
