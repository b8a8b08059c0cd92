# Every target uses the virtual environment at .venv (created on demand).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast lint reference-data reference-model bench clean

# runtime/_native.c is compiled by the install: a changed kernel needs a fresh one.
$(STAMP): pyproject.toml runtime/_native.c runtime/_stages.c runtime/_stages.h runtime/_marginals.c runtime/_marginals.h
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[export,dev]"
	touch $(STAMP)

setup: $(STAMP)

# The main job: export the shipped reference DynaMo-T3 and generate from it.
run: $(STAMP)
	$(BIN)/python -m scripts.run_main

# The whole suite, slow integration tests included (CI runs exactly this).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Python docs corpus -> tokenizer -> token files in data/reference (git-ignored).
reference-data: $(STAMP)
	$(BIN)/python -m scripts.reference_data

# Rebuild artifacts/reference-{base,t3} from scratch (about 1.5 h on 2 cores); resumes.
reference-model: $(STAMP)
	$(BIN)/python -m scripts.reference_model

clean:
	rm -rf out work .pytest_cache .ruff_cache
