# Two commands do all the set-up on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 is the CPU build on our machines and CI; an unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
WORKDIR ?= quickstart

export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install quickstart test bench clean

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

quickstart: install
	HF_HUB_OFFLINE=1 $(BIN)/iterdpo quickstart --workdir $(WORKDIR)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python bench/catalog.py

clean:
	rm -rf $(VENV) $(WORKDIR) .pytest_cache
