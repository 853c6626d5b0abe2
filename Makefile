# Every target sets up its own virtual environment: a fresh clone needs nothing else.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# PyTorch's CPU wheels (the default index would pull a multi-GB CUDA build). Used only when pip's
# own configuration (find-links) does not already offer torch on disk, as it does on this
# project's machines.
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu

.PHONY: chromium venv test test-device-scripts test-unit test-fast lint demo models clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch: from pip's find-links where it lies on disk (no index asked), else
	# from TORCH_INDEX_URL; then its dependencies from the usual index (2.13.0+cpu satisfies ==2.13.0).
	$(PY) -m pip install -q --no-deps --no-index torch==2.13.0 2>/dev/null \
	  || $(PY) -m pip install -q --no-deps --index-url $(TORCH_INDEX_URL) torch==2.13.0
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# open_clip ships the real CLIP BPE vocabulary; its torchvision dependency is not needed.
	$(PY) -m pip install -q --no-deps open_clip_torch==3.3.0
	touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check orchestrator tests bench loadtest triton_models
	$(VENV)/bin/mypy

test: venv lint chromium
	$(VENV)/bin/pytest -q -ra -m "not device_script"

# the GPU bench scripts run on the CPU with tiny models (minutes of torch start-up in Triton's
# Python stubs); CI runs them after `make test`
test-device-scripts: venv
	$(VENV)/bin/pytest -q -ra -m device_script

# the gateway's playground test drives Debian's chromium through Playwright (never
# `playwright install`)
chromium:
	command -v chromium >/dev/null || apt-get install -y chromium || \
		(apt-get update && apt-get install -y chromium)

test-unit: venv
	$(VENV)/bin/pytest -q -ra tests/unit

models: venv
	$(VENV)/bin/orchestrator models build --preset tiny --out build/models/tiny

demo: venv
	$(PY) -m orchestrator.demo

clean:
	rm -rf build out .pytest_cache .mypy_cache .ruff_cache
