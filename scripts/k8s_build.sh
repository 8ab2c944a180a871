#!/usr/bin/env bash
# Build (once) and cache the Kubernetes control plane the Kubernetes backend's
# tests run against: kube-apiserver, kube-controller-manager, kube-scheduler
# from Debian's `kubernetes` source package, plus Debian's etcd.
#
# No registry here ships kind, k3s or kwok, and no image can be pulled, so the
# real control plane is built from source (about 6.5 minutes on 2 cores) and
# cached outside the work tree, keyed by version; later runs skip the build.
# See ../shared/design/KUBERNETES.md.
#
#   scripts/k8s_build.sh            build if missing; print the bin folder
#   LLMSERVE_K8S_CACHE=DIR          where the cache lives (default ~/.cache/llmserve)
set -euo pipefail

version=1.20.2
cache="${LLMSERVE_K8S_CACHE:-$HOME/.cache/llmserve}/k8s-$version"
bin="$cache/bin"
want=(kube-apiserver kube-controller-manager kube-scheduler)

have_all() {
  for b in "${want[@]}"; do [ -x "$bin/$b" ] || return 1; done
  command -v etcd >/dev/null 2>&1
}

if have_all; then echo "$bin"; exit 0; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "building the test control plane needs root and apt-get (Debian)" >&2
  exit 3
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq golang-go rsync etcd-server openssl iproute2 >/dev/null
if [ ! -f /etc/apt/sources.list.d/debian-src.sources ]; then
  sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
    > /etc/apt/sources.list.d/debian-src.sources
  apt-get update -qq >&2
fi

work="$cache/src"
mkdir -p "$work" "$bin"
cd "$work"
ls kubernetes_*.orig.tar.gz >/dev/null 2>&1 || apt-get source --download-only kubernetes >&2
[ -d "kubernetes-$version" ] || tar xzf kubernetes_*.orig.tar.gz
cd "kubernetes-$version"
mkdir -p .go/src/k8s.io
[ -e .go/src/k8s.io/kubernetes ] || ln -s ../../.. .go/src/k8s.io/kubernetes
GOPATH=$PWD/.go CGO_ENABLED=0 GOPROXY=off \
  make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler" >&2
for b in "${want[@]}"; do
  install -m 0755 "$(find _output -type f -name "$b" -path '*/bin/*' | head -1)" "$bin/$b"
done
# The 2.6 GB source tree is only needed to build; keep the binaries.
cd "$cache" && rm -rf "$work"
echo "$bin"
