# Every target uses the virtual environment at .venv (created on demand).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast lint java-check reference-data reference-model bench clean

# runtime/_native.c is compiled by the install: a changed kernel needs a fresh one.
$(STAMP): pyproject.toml runtime/_native.c runtime/_stages.c runtime/_stages.h runtime/_marginals.c runtime/_marginals.h
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[export,judge,dev]"
	touch $(STAMP)

setup: $(STAMP)

# The main job: export the shipped reference DynaMo-T3 and generate from it.
run: $(STAMP)
	$(BIN)/python -m scripts.run_main

# The whole suite, slow integration tests included (CI runs exactly this).
test: $(STAMP) java-check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

# tests/test_cooccurrence_spark.py runs pyspark 4 (the dev extra installs it), which needs Java 17+:
# without one, stop here with one line saying so (pip cannot install Java).
java-check: $(STAMP)
	@$(BIN)/python -c 'import sys; from dynamo_export.spark_session import java_problem; p = java_problem(); sys.exit(p and f"make test: {p}")'

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

# The README's benchmark of the shipped model (about 30 min on 2 cores; runners interleave call by call):
# ar, dynamic over the eps_b sweep, verify, the Table 9 ablation, Optimum and PyTorch, 1 thread, 5 seeds
# (the same-quality rule reads the seed-to-seed spread: fewer seeds make it a rough estimate).
BENCH_EPS := 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1
bench: $(STAMP)
	test -f out/reference-t3-onnx/manifest.json || $(BIN)/python -m scripts.run_main
	test -d data/reference/corpus/heldout || $(BIN)/python -m scripts.reference_data
	$(BIN)/dynamo-bench --artifact out/reference-t3-onnx --baseline artifacts/reference-base \
		--in-domain data/reference/corpus/heldout --num-in-domain 30 --seeds 0,1,2,3,4 --threads 1 --repeats 2 --eps-b $(BENCH_EPS) --ablation 0.5 \
		--json docs/bench-reference.json --markdown docs/bench-reference.md \
		--plot docs/speedup_vs_quality.png --plot-shares docs/emission_shares.png

clean:
	rm -rf out work .pytest_cache .ruff_cache
