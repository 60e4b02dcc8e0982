# `make demo` and `make test` are all a fresh machine needs; both install first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# pytest-xdist workers for `make test` (auto: one per core, at most 4, so a large GPU node does not
# start dozens of stage processes on one GPU; each test's stages get an equal share of the cores).
# 0 runs the tests one at a time in one process.
TEST_WORKERS ?= auto
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile --no-loadscope-reorder
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint format clean

install: $(STAMP)

# Re-run only when the dependency list (or this file) changes; torch and deepspeed are kept when present
# (a GPU machine keeps its own CUDA torch build).
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==$(TORCH_VERSION)"
	@$(PIP) install -q numpy setuptools wheel packaging ninja
	@# DeepSpeed's sdist imports torch in setup.py, so it must see the installed torch.
	@$(PY) -c "import deepspeed" 2>/dev/null || $(PIP) install -q --no-build-isolation deepspeed
	@$(PIP) install -q --no-build-isolation -e ".[dev]"
	@# DeepSpeed JIT-builds its shared-memory comm op for the CPU accelerator at the first
	@# init_distributed (about 30 s, cached after); build it here instead of in the first run.
	@$(PY) -c "from core.deepspeed import build_cpu_comm_op; build_cpu_comm_op()"
	@touch $(STAMP)

# The whole pipeline on the built-in task (about 8-9 minutes on 2 CPU cores); re-running skips what is done.
demo: install
	$(VENV)/bin/rlhf pipeline
	@echo "report: outputs/pipeline/builtin/report.md (self-contained: report.html; figures: report.json)"

test: install
	$(PYTEST) --durations=20 tests

test-fast: install
	$(PYTEST) -m "not slow" tests

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf outputs multirun .pytest_cache
