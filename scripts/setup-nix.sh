#!/usr/bin/env bash
# Install and configure Nix for offline, single-user use as root (idempotent).
# Debian's nix-bin 2.8 runs without a daemon; the config below is what makes it
# usable with no network (see the README's "Nix on this machine").
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "setup-nix.sh must run as root (it installs packages and writes /etc/nix)" >&2
  exit 1
fi

need=()
command -v nix >/dev/null 2>&1 || need+=(nix-bin)
getent group nixbld >/dev/null 2>&1 || need+=(nix-setup-systemd)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
if [ "${#need[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# nix-setup-systemd creates nixbld users through a systemd unit; without systemd
# running (containers, CI) create them by hand so sandboxed builds have users.
if ! getent group nixbld >/dev/null 2>&1; then
  groupadd --system nixbld
fi
for i in $(seq 1 8); do
  if ! id "nixbld$i" >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir /var/empty --shell /usr/sbin/nologin \
      --gid nixbld --groups nixbld "nixbld$i"
  fi
done

mkdir -p /etc/nix /nix/var/nix/gcroots/niphas
conf=/etc/nix/nix.conf
desired='experimental-features = nix-command flakes
substituters =
sandbox = true
build-users-group = nixbld
narinfo-cache-negative-ttl = 0
require-sigs = true'
if [ ! -f "$conf" ] || [ "$(cat "$conf")" != "$desired" ]; then
  printf '%s\n' "$desired" > "$conf"
fi

nix --version
