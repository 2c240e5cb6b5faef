#!/usr/bin/env bash
# Debian packages the test suite uses besides Nix and the apiserver (idempotent, root):
# git (the forge repositories of the eval and demo tests), GNU time (peak RSS of nix
# processes in tests/faults), util-linux (unshare, prlimit, setpriv for the CSI tests),
# openssh (sshd on loopback: the private ssh forge of the eval tests; no daemon is left on).
set -euo pipefail
# shellcheck source=apt.sh
source "$(dirname "$0")/apt.sh"
apt_install git time util-linux openssh-client openssh-server
