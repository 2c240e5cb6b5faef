#!/usr/bin/env bash
# What a real single-node Kubernetes needs on this machine (idempotent): the container
# runtime from Debian (containerd, runc, the CNI plugins, iptables, conntrack), umoci to pack
# OCI images, and the Kubernetes binaries built once by setup-kube.sh (cached outside the
# checkout). `make cluster` and the tests' real-node fixture run this first.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "setup-node.sh must run as root (it installs packages)" >&2
  exit 1
fi

# shellcheck source=apt.sh
source scripts/apt.sh
apt_install containerd runc containernetworking-plugins iptables conntrack dnsmasq-base umoci \
  debootstrap iproute2 iputils-ping util-linux gcc libc6-dev
# Debian starts containerd as a service where an init system runs it; the node runs its own
# instance with its own config and socket, so a system one is left alone either way.
bash scripts/setup-kube.sh
