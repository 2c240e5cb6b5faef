#!/usr/bin/env bash
# Build the platform's OCI image offline (as root): a Debian bookworm base bootstrapped from
# the machine's configured Debian mirror, the packages of deploy/image/packages.txt, the
# nixbld users, deploy/image/nix.conf, and the project installed into /opt/niphas from wheels
# built here. Written as an OCI archive with umoci (tag niphas.local/niphas:dev) to
# $NIPHAS_IMAGE_CACHE/niphas.oci.tar; a node started by `make cluster` imports it. Rebuilt
# only when the project's files change. Prints the archive's path and size last.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${NIPHAS_IMAGE_CACHE:-/var/cache/niphas/image}"
archive="$cache/niphas.oci.tar"
tag=dev
python="${PYTHON:-.venv/bin/python}"

[ "$(id -u)" -eq 0 ] || { echo "build-image.sh must run as root (debootstrap, chroot)" >&2; exit 1; }
for tool in debootstrap umoci; do
  command -v "$tool" >/dev/null || {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends debootstrap umoci >/dev/null
  }
done

# The image changes when a tracked file of the project changes (or this script does).
key="$(git ls-files -z -- pyproject.toml libs schemas services deploy/image scripts/build-image.sh \
  | xargs -0 sha256sum | sha256sum | cut -c1-32)"
if [ -f "$archive" ] && [ "$(cat "$cache/key" 2>/dev/null)" = "$key" ]; then
  echo "$archive $(du -m "$archive" | cut -f1) MB (cached)"
  exit 0
fi

# The machine's own Debian mirror (never a host name written here).
mirror="$(awk '/^URIs:/ {u=$2} /^Suites:/ && / bookworm( |$)/ {print u; exit}' \
  /etc/apt/sources.list.d/*.sources 2>/dev/null || true)"
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
  mirror="$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list)"
fi
[ -n "$mirror" ] || { echo "no bookworm mirror in the machine's apt sources" >&2; exit 1; }

work="$(mktemp -d /var/tmp/niphas-image.XXXXXX)"
cleanup() {
  umount "$work/bundle/rootfs/proc" 2>/dev/null || true
  # Never delete through a mount that is still there.
  if grep -q " $work/" /proc/self/mounts; then
    echo "left $work in place: something is still mounted below it" >&2
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT
oci="$work/oci"
bundle="$work/bundle"
umoci init --layout "$oci"
umoci new --image "$oci:$tag"
umoci unpack --image "$oci:$tag" "$bundle"
root="$bundle/rootfs"

echo "debootstrap bookworm" >&2
debootstrap --variant=minbase --include=python3,python3-venv bookworm "$root" "$mirror" \
  >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
# The rest through apt inside the new root (some maintainer scripts, e.g. nix-bin's perl
# dependencies, need /proc, which debootstrap's second stage does not provide).
mount -t proc proc "$root/proc"
cp /etc/hosts /etc/resolv.conf "$root/etc/"
packages="$(grep -v '^#' deploy/image/packages.txt | tr '\n' ' ')"
echo "apt-get install $packages" >&2
# A clean environment: the host's pip and proxy settings name paths the new root lacks.
in_root=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 chroot "$root")
"${in_root[@]}" /bin/sh -eu -c "
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $packages >/dev/null
"

echo "wheels of the project" >&2
# Only the package index: find-links the host may configure are not part of the image.
PIP_FIND_LINKS= "$python" -m pip wheel -q --wheel-dir "$root/tmp/wheels" . >"$work/pip.log" 2>&1 \
  || { tail -20 "$work/pip.log" >&2; exit 1; }
"${in_root[@]}" /bin/sh -eu -c '
  groupadd --system nixbld
  for i in 1 2 3 4 5 6 7 8; do
    useradd --system --no-create-home --home-dir /var/empty --shell /usr/sbin/nologin \
      --gid nixbld --groups nixbld "nixbld$i"
  done
  # The unprivileged user the manifests run as (runAsUser 65532): nix needs a user name.
  groupadd --gid 65532 nonroot
  useradd --uid 65532 --gid 65532 --no-create-home --home-dir /home/nonroot \
    --shell /usr/sbin/nologin nonroot
  python3 -m venv /opt/niphas
  /opt/niphas/bin/pip install -q --no-index --find-links /tmp/wheels niphas
  rm -rf /tmp/wheels /root/.cache /var/cache/apt/archives/*.deb /var/lib/apt/lists/* \
    /usr/share/doc /usr/share/man /usr/share/locale
'
install -D -m 0644 deploy/image/nix.conf "$root/etc/nix/nix.conf"
umount "$root/proc"
# The host's name resolution was only needed by apt; the image gets its own from the pod.
: > "$root/etc/resolv.conf"
printf '127.0.0.1 localhost\n::1 localhost\n' > "$root/etc/hosts"

umoci repack --image "$oci:$tag" "$bundle"
umoci config --image "$oci:$tag" \
  --config.entrypoint=/opt/niphas/bin/niphas \
  --config.env=PATH=/opt/niphas/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.env=LANG=C.UTF-8
mkdir -p "$cache"
tar -C "$oci" -cf "$archive.tmp" .
mv -f "$archive.tmp" "$archive"
echo "$key" > "$cache/key"
echo "$archive $(du -m "$archive" | cut -f1) MB"
