# Mask R-CNN segmentation service: ONNX Runtime + FastAPI, no PyTorch at run time.
#
#   CPU (default):  docker build -t mrcnn-service:cpu .
#   GPU:            docker build --build-arg VARIANT=gpu -t mrcnn-service:gpu .
#                   docker run --gpus all -p 8000:8000 mrcnn-service:gpu
#   Other model:    docker run -v /path/to/models:/models:ro \
#                       -e MRCNN_MODEL_PATH=/models/model.onnx -p 8000:8000 mrcnn-service:cpu
#
# Stages: base-cpu / base-gpu (the interpreter) -> builder (a virtualenv with the serving
# dependencies, from binary wheels) -> runtime (the virtualenv without pip, the service, the demo
# model; no PyTorch, non-root). VARIANT picks the base; everything else is shared.

ARG VARIANT=cpu
# Pinned base images (for reproducible builds, pin by digest as well: image:tag@sha256:...).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
# CUDA 12 + cuDNN 9 runtime: what the onnxruntime-gpu wheels that pyproject's `gpu` extra allows link.
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base-cpu
ENV MRCNN_PROVIDERS=CPUExecutionProvider

# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS base-gpu
# Ubuntu 24.04's python3 is 3.12 (the project needs >= 3.11); python3-venv only to create the venv.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && ln -sf /usr/bin/python3 /usr/local/bin/python
# The CUDA execution provider first, CPU as the fallback for ops CUDA does not cover.
ENV MRCNN_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider

# ---------------------------------------------------------------------------------------------
FROM base-${VARIANT} AS builder
ARG VARIANT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# 1) The serving dependencies: pyproject's core `dependencies` (no extras, so no torch). For the GPU
#    variant, onnxruntime is replaced by the `gpu` extra's onnxruntime-gpu (both wheels install the
#    same `onnxruntime` package, so only one of them may be present). Binary wheels only: every
#    dependency publishes them for linux x86_64 and aarch64, so the build needs no compiler (a
#    dependency that lost its wheel fails here, loudly, instead of compiling for minutes).
COPY pyproject.toml ./
RUN python -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
deps = p['dependencies']; \
deps = [d for d in deps if not d.startswith('onnxruntime')] + p['optional-dependencies']['gpu'] \
if sys.argv[1] == 'gpu' else deps; \
print('\n'.join(deps))" "${VARIANT}" > /tmp/requirements.txt \
    && cat /tmp/requirements.txt \
    && pip install --upgrade pip \
    && pip install --only-binary=:all: -r /tmp/requirements.txt

# 2) The service and the graph contract it reads, without touching the dependencies resolved above.
#    Then pip and setuptools leave the venv: serving never installs anything (23 MB less at run time).
COPY README.md contract.py ./
COPY service ./service
#    For the GPU variant, every library the CUDA provider links must be in the base (libcuda.so.1 is the
#    driver's, mounted at run time by the NVIDIA Container Toolkit): a CUDA major the wheel was not built
#    for fails here instead of serving on the CPU on a GPU machine.
RUN pip install --no-deps . \
    && python -c "import onnxruntime, contract, service.app; print('providers:', onnxruntime.get_available_providers())" \
    && ! python -c "import torch" 2>/dev/null \
    && if [ "${VARIANT}" = gpu ]; then \
         ldd /opt/venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so > /tmp/cuda-libs \
         && ! grep "not found" /tmp/cuda-libs | grep -v "libcuda\.so\.1"; \
       fi \
    && python -m pip uninstall -y pip setuptools

# ---------------------------------------------------------------------------------------------
FROM base-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="mrcnn-service" \
      org.opencontainers.image.description="Mask R-CNN instance segmentation over ONNX Runtime (${VARIANT})"

RUN groupadd --system --gid 10001 mrcnn \
    && useradd --system --uid 10001 --gid mrcnn --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin mrcnn

COPY --from=builder /opt/venv /opt/venv
# The bundled demo model; another one comes in through a volume and MRCNN_MODEL_PATH.
COPY models/demo/ /opt/mrcnn/models/demo/

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MRCNN_MODEL_PATH=/opt/mrcnn/models/demo/model.onnx \
    MRCNN_HOST=0.0.0.0 \
    MRCNN_PORT=8000 \
    MRCNN_GRPC_PORT=8001

WORKDIR /opt/mrcnn
USER 10001:10001
# HTTP (/segment, /v2, probes, metrics) and the Open Inference Protocol over gRPC.
EXPOSE 8000 8001

# Liveness only (/readyz is for the load balancer / orchestrator); no curl in the image, so Python.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('MRCNN_PORT', '8000'), timeout=2)" || exit 1

# The service reads MRCNN_MODEL_PATH, MRCNN_HOST, MRCNN_PORT and every other MRCNN_* setting from the
# environment (service/core/settings.py). Exec form: Python is PID 1 and gets SIGTERM (docker stop), on which
# it drains: readiness goes false, in-flight requests finish, exit 0. Give it a stop timeout above
# MRCNN_DRAIN_TIMEOUT_S (compose: stop_grace_period).
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service"]
