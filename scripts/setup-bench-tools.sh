#!/usr/bin/env bash
# Tools the benchmarks use (idempotent): nginx serving a static binary cache as a baseline;
# mkfs.ext4 for the scratch file system node stores live on (bench/scratch_fs.py); ip and tc
# for the network model's namespaces and rate-limited links (bench/netns.py).
set -euo pipefail
if ! command -v tc >/dev/null 2>&1 && [ ! -x /usr/sbin/tc ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends iproute2 >/dev/null
fi
if ! command -v mkfs.ext4 >/dev/null 2>&1 && [ ! -x /usr/sbin/mkfs.ext4 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends e2fsprogs >/dev/null
fi
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends nginx-light >/dev/null
  # The package starts a system nginx on port 80; the benchmark runs its own.
  if command -v systemctl >/dev/null 2>&1; then systemctl disable --now nginx >/dev/null 2>&1 || true; fi
  if [ -f /run/nginx.pid ]; then kill "$(cat /run/nginx.pid)" 2>/dev/null || true; fi
fi
/usr/sbin/nginx -v
