# Two commands do everything on a fresh machine with Python 3.11 + pip:
#   make run    build the embedded default (venv, then `snakemake --cores $(CORES)`)
#   make test   the test suite (venv, then pytest)
#   make ablations  the router ablation tables (Sec. 5.4, 5.5), a target of their own
#   make regime     per cell and scheme, is it in the paper's regime (docs/regime.md)
#   make agents rebuild the shipped tiny agents under agents/ from their recipes (about an hour)
PYTHON ?= python3
VENV ?= .venv
CORES ?= 2
BIN := $(VENV)/bin

.PHONY: run test lint dry-run agents ablations regime

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

run: $(VENV)/.installed
	PATH=$(CURDIR)/$(BIN):$$PATH snakemake --cores $(CORES) $(ARGS)

ablations: $(VENV)/.installed
	PATH=$(CURDIR)/$(BIN):$$PATH snakemake ablations --cores $(CORES) $(ARGS)

regime: $(VENV)/.installed
	PATH=$(CURDIR)/$(BIN):$$PATH snakemake regime --cores $(CORES) $(ARGS)

agents: $(VENV)/.installed
	PATH=$(CURDIR)/$(BIN):$$PATH snakemake agents $(ARGS) --cores $(CORES) --configfile config/config.yaml config/agents.yaml

test: $(VENV)/.installed
	PATH=$(CURDIR)/$(BIN):$$PATH python -m pytest -q -n $(CORES) --maxschedchunk 1 --dist loadgroup $(ARGS)

lint: $(VENV)/.installed
	PATH=$(CURDIR)/$(BIN):$$PATH snakemake --lint
	$(BIN)/ruff check dmr tests benchmarks
	$(BIN)/snakefmt --check Snakefile workflow/rules/*.smk

dry-run: $(VENV)/.installed
	PATH=$(CURDIR)/$(BIN):$$PATH snakemake -n
