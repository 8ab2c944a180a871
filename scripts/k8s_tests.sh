#!/usr/bin/env bash
# The Kubernetes backend's tests, against a real control plane: build (once, cached) the
# apiserver, controller-manager and scheduler, then run the tests marked `kubernetes` inside a
# network namespace of their own (nothing they start is reachable from, or reaches, any other
# address). `make test` runs this after the main suite.
#
#   LLMSERVE_K8S_TESTS=skip   skip them (machines without root or unshare)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${LLMSERVE_K8S_TESTS:-}" = skip ]; then
  echo "Kubernetes tests skipped (LLMSERVE_K8S_TESTS=skip)"; exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v unshare >/dev/null 2>&1; then
  echo "Kubernetes tests need root and unshare (a network namespace); set LLMSERVE_K8S_TESTS=skip to skip" >&2
  exit 3
fi
bash scripts/k8s_build.sh >/dev/null
exec unshare --net -- bash -c 'ip link set lo up && LLMSERVE_K8S_TESTS=1 exec "$0" -m pytest -m kubernetes "$@"' \
  .venv/bin/python "$@"
