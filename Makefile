PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

COCO_MODEL := models/coco/maskrcnn_v2.onnx
MODEL ?=

.PHONY: install test test-fast test-gpu lint serve bench coco-model deploy-deps clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[train,dev,annotation,ray,bulk]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Two workers, a test file each at a time (module fixtures such as the Docker engine stay single).
test: $(STAMP) lint
	$(VENV)/bin/pytest -q -n 2 --dist loadfile

# The fast tier (pyproject.toml's markers): unit tests and the tiny model's service tests, a few minutes.
test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -n 2 --dist loadfile -m "not slow and not docker and not browser and not gpu"

# The CUDA set (tests/test_gpu.py), on a machine with a GPU.
test-gpu: $(STAMP)
	bash scripts/gpu_tests.sh

serve: $(STAMP)
	$(PY) -m service --host 0.0.0.0 --port 8000 $(if $(MODEL),--model $(MODEL))

# torchvision's v2 COCO weights (47.4 box / 41.8 mask AP), fetched through torchvision's weights API into
# TORCH_HOME (~/.cache/torch) once, exported and verified: then `make serve MODEL=models/coco/maskrcnn_v2.onnx`.
coco-model: $(STAMP)
	$(PY) -m export --weights MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1 --out $(COCO_MODEL)

bench: $(STAMP)
	$(PY) -m benchmarks.export_speed
	$(PY) -m benchmarks.postprocess_speed
	$(PY) -m benchmarks.serve_load
	$(PY) -m benchmarks.int8_speed

deploy-deps:
	bash scripts/install_deploy_deps.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
