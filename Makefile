# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv/ on first use.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install demo test lint format clean-results

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

## Build the embedded tiny model, train all seven modes, evaluate, and print the results table.
demo: install
	snakemake
	@cat results/demo/tables/results.md
	@echo "plot: results/demo/plots/training_curves.png"

## The whole test suite (unit, integration and one end-to-end workflow run).
test: install
	pytest -q

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
