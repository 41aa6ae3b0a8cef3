# Two commands, both self-contained on a fresh machine (Python >= 3.11 and make):
#   make demo   set up .venv, sample crystals from the shipped Perov-5 model, evaluate them
#   make test   set up .venv, lint, and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The stability extra pins torch 2.13.0. Where pip finds its CPU build locally (this
# project's machines: /opt/wheels) nothing more is needed; elsewhere PyPI's Linux torch is
# the CUDA build (several GB): `make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
TORCH_INDEX ?=

.PHONY: setup demo test test-slow lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt \
		$(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) -e '.[dev,stability]'
	touch $(STAMP)

DEMO ?= demo
demo: setup
	$(BIN)/autoperi sample --pretrained perov_5 -n 1200 --seed 0 --out $(DEMO)/samples.extxyz
	$(BIN)/autoperi sample --pretrained perov_5 -n 8 --spacegroup 221 --seed 0 \
		--out $(DEMO)/cubic_cifs
	$(BIN)/autoperi eval --task gen --samples $(DEMO)/samples.extxyz \
		--reference perov_5:test --out $(DEMO)/report
	@echo "samples: $(DEMO)/samples.extxyz and $(DEMO)/cubic_cifs/*.cif (space group 221)"
	@echo "report:  $(DEMO)/report/report.md (metrics.json, plots *.png)"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The tests read the benchmark splits by path and never download: AUTOPERI_DATA (default
# the shared data folder beside the checkout), AUTOPERI_OFFLINE=1.
TEST_DATA ?= $(abspath ../shared/data)
TEST_ENV = AUTOPERI_DATA="$${AUTOPERI_DATA:-$(TEST_DATA)}" AUTOPERI_OFFLINE=1

test: lint
	$(TEST_ENV) $(BIN)/python -m pytest -n 2 -m "not slow" -q

test-slow: setup
	$(TEST_ENV) $(BIN)/python -m pytest -m slow -q

bench: setup
	$(BIN)/autoperi bench --pretrained perov_5 --out bench/bench.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
