#!/usr/bin/env bash
# The GPU set (tests/test_gpu.py, marker `gpu`) on a machine with CUDA: RoIAlign and NMS on CUDA against the
# CPU, ONNX Runtime's CUDA provider against the CPU's on the tiny graph (needs onnxruntime-gpu: pip install
# '.[gpu]'), and one training step. Without CUDA every test is skipped, and this says so.
#   scripts/gpu_tests.sh [pytest options]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.cuda.is_available() and torch.cuda.get_device_name(0))'
"$PYTHON" -c 'import onnxruntime as ort; print("onnxruntime", ort.__version__, ort.get_available_providers())'
exec "$PYTHON" -m pytest -m gpu -p no:cacheprovider -rs "$@" tests/test_gpu.py
