# megatron-sip: `make demo` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.megatron-sip-installed
# On CPU machines pip must take the local CPU build of torch (any other spec pulls a CUDA build).
CPU_TORCH := torch==2.13.0
HAVE_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
export OMP_NUM_THREADS ?= 1

.PHONY: install demo demo-learned demo-ablation test test-fast lint format clean

install: $(STAMP)

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*)
ifeq ($(HAVE_GPU),1)
	# GPU machines: reuse the system's CUDA torch (and Transformer Engine, if installed).
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
else
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(CPU_TORCH)
endif
	# --no-build-isolation: the C++/CUDA op builds against the venv's torch (an isolated build
	# would download another one).
	$(PY) -m pip install --quiet --no-build-isolation -e '.[dev,eval]'
	touch $(STAMP)

# The main job on its embedded default: corpus -> tokenizer -> indexed data -> base policy ->
# NLL vs SIP continual pretraining -> held-out evaluation -> runs/demo/report.md (and .json, PNGs).
demo: $(STAMP)
	$(PY) tools/run_demo.py --output-dir runs/demo

# The same, and SIP with a learned judge (SFT, GRPO) and rewriter (SFT, RL), graded by the oracle.
demo-learned: $(STAMP)
	$(PY) tools/run_demo.py --output-dir runs/demo --learned-roles

# SFT on rewrites, RF-NLL, online DPO with 1 and with K rollouts, each against the same baseline.
demo-ablation: $(STAMP)
	$(PY) tools/run_demo.py --output-dir runs/demo --ablation

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

# Skips the multi-process end-to-end tests (CI runs them through `make test`).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info
