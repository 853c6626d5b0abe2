# Every target sets up its own virtual environment: a fresh clone needs nothing else.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test test-unit test-fast lint demo models clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch lies on this machine's disk; any other spec pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# open_clip ships the real CLIP BPE vocabulary; its torchvision dependency is not needed.
	$(PY) -m pip install -q --no-deps open_clip_torch==3.3.0
	touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check orchestrator tests bench loadtest triton_models
	$(VENV)/bin/mypy

test: venv lint
	$(VENV)/bin/pytest -q -ra

test-unit: venv
	$(VENV)/bin/pytest -q -ra tests/unit

models: venv
	$(VENV)/bin/orchestrator models build --preset tiny --out build/models/tiny

demo: venv
	$(PY) -m orchestrator.demo

clean:
	rm -rf build out .pytest_cache .mypy_cache .ruff_cache
