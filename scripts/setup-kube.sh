#!/usr/bin/env bash
# Build the Kubernetes binaries the tests and `make cluster` run, and cache them outside the
# checkout (idempotent: with the cached binaries present this returns at once).
#
# No package registry ships kube-apiserver or kubelet, but Debian bookworm's source package
# `kubernetes` holds the full source with vendored dependencies and builds offline with
# Debian's Go: kube-apiserver, kubelet, kube-controller-manager, kube-scheduler, kube-proxy,
# and the static `pause` binary of the node's sandbox image (build/pause/linux/pause.c).
# Also installs etcd-server (the apiserver's storage) and kubectl if absent.
#
# Prints the apiserver binary's path as its last line. Environment:
#   NIPHAS_KUBE_CACHE  cache root (default /var/cache/niphas/kube-apiserver); the binaries
#                      end up in $NIPHAS_KUBE_CACHE/<debian version>/ and
#                      $NIPHAS_KUBE_CACHE/current points at the newest build.
set -euo pipefail

cache_root="${NIPHAS_KUBE_CACHE:-/var/cache/niphas/kube-apiserver}"
current="$cache_root/current/kube-apiserver"
binaries=(kube-apiserver kubelet kube-controller-manager kube-scheduler kube-proxy)

if [ "$(id -u)" -ne 0 ]; then
  echo "setup-kube.sh must run as root (it installs packages)" >&2
  exit 1
fi

# shellcheck source=apt.sh
source "$(dirname "$0")/apt.sh"

# Runtime pieces the test fixture needs next to the binary.
apt_install etcd-server openssl
command -v kubectl >/dev/null 2>&1 || apt_install kubernetes-client

cached=1
for b in "${binaries[@]}" pause; do
  [ -x "$cache_root/current/$b" ] || cached=0
done
if [ "$cached" -eq 1 ] && "$current" --version >/dev/null 2>&1; then
  echo "$current"
  exit 0
fi

apt_install golang-go golang-github-modern-go-reflect2-dev dpkg-dev make rsync gcc libc6-dev

work="$(mktemp -d /var/tmp/niphas-kube-build.XXXXXX)"
trap 'rm -rf "$work"' EXIT

# deb-src entries derived from the machine's own apt sources, in a private apt
# config so the machine's configuration stays untouched.
mkdir -p "$work/apt/sources.list.d" "$work/apt/lists/partial"
: > "$work/apt/sources.list"
for f in /etc/apt/sources.list.d/*.sources; do
  [ -e "$f" ] || continue
  sed -E 's/^Types:[[:space:]]*deb([[:space:]]|$)/Types: deb-src\1/' "$f" \
    > "$work/apt/sources.list.d/$(basename "$f")"
done
if [ -f /etc/apt/sources.list ]; then
  sed -nE 's/^deb([[:space:]])/deb-src\1/p' /etc/apt/sources.list > "$work/apt/sources.list"
fi
apt_private=(
  -o "Dir::Etc::sourcelist=$work/apt/sources.list"
  -o "Dir::Etc::sourceparts=$work/apt/sources.list.d"
  -o "Dir::State::Lists=$work/apt/lists"
  -o "APT::Sandbox::User=root"
)
apt-get "${apt_private[@]}" update -qq
(cd "$work" && apt-get "${apt_private[@]}" source -qq kubernetes >/dev/null)

src="$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)"
[ -n "$src" ] || { echo "apt-get source kubernetes produced no source tree" >&2; exit 1; }
version="$(cd "$src" && dpkg-parsechangelog -S Version)"

# The vendored reflect2 1.0.1 crashes under Go >= 1.18 on the first custom-resource
# request (fatal error: fault in mapiternext); Debian's 1.0.2 copy fixes it.
rm -rf "$src/vendor/github.com/modern-go/reflect2"
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$src/vendor/github.com/modern-go/reflect2"

upstream="${version#*really}"
upstream="${upstream%%-*}"
(
  cd "$src"
  export GO111MODULE=off GOPROXY=off CGO_ENABLED=0
  export GOCACHE="$work/gocache" GOPATH="$work/gopath"
  export KUBE_GIT_VERSION="v${upstream}" KUBE_GIT_TREE_STATE=clean
  make WHAT="$(printf 'cmd/%s ' "${binaries[@]}")"
)

mkdir -p "$cache_root/$version"
for b in "${binaries[@]}"; do
  built="$(find "$src/_output" -type f -name "$b" -perm -u+x | head -n1)"
  [ -n "$built" ] || { echo "the build produced no $b binary" >&2; exit 1; }
  install -m 0755 "$built" "$cache_root/$version/$b.tmp"
  mv -f "$cache_root/$version/$b.tmp" "$cache_root/$version/$b"
done
# The sandbox ("pause") container's process, static so its image needs nothing else.
gcc -Os -static -DVERSION="v${upstream}" -o "$cache_root/$version/pause.tmp" "$src/build/pause/linux/pause.c"
mv -f "$cache_root/$version/pause.tmp" "$cache_root/$version/pause"
ln -sfn "$version" "$cache_root/current"
"$current" --version >&2
echo "$current"
