# RetrievalSeg developer entry points.
#   make test   create .venv if missing, install the hash-pinned lock, run the test suite
#   make bench  engine vs official SAM2VideoPredictor latency (random weights, CPU unless cuda)
#   make bench-volume  whole-volume slices/s: per-slice fp32 path vs batched path (random weights)
#   make bench-bank  grow a bank to 20,000 slices: add / search / open cost (ends bank_add_growth, bank_search_ms_20k)
#   make bench-cohort  rseg segment-cohort volumes/min with 1 vs N workers (random weights; prints the machine)
#   make bench-report  seconds to write the report of a 300-slice volume and of a 200-volume cohort (no model)
#   make mutants  apply Testing/mutants.txt one by one to a copy; every mutant must be killed (~20 min)
#   make demo   synthetic study -> bank -> segmentation with real weights from the cache
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.rseg-installed
# Tests and CI never reach a model hub.
OFFLINE := RSEG_OFFLINE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: test test-all bench bench-volume bench-bank bench-cohort bench-report demo install clean mutants

$(PY):
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "RetrievalSeg needs Python >= 3.10 (sam2 does)"'
	$(PYTHON) -m venv $(VENV)

# Every package comes from the hash-pinned lock (pip refuses any file whose SHA-256 is not listed);
# sam2 (a source upload) from its own hash-pinned file; the project itself last, without dependencies.
# requirements.txt is the lock's input: regenerate the lock after editing it (README, "Dependencies").
$(STAMP): $(PY) requirements.lock requirements-sam2.lock pyproject.toml
	$(PY) -m pip install --require-hashes -r requirements.lock
	SAM2_BUILD_CUDA=0 $(PY) -m pip install --require-hashes --no-deps --no-build-isolation -r requirements-sam2.lock
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	$(PY) -c 'import torch, sam2, transformers, faiss, SimpleITK, slicer, vtk, slicerio, filelock, matplotlib, jinja2, websocket, highdicom; print("dependencies ok, torch", torch.__version__)'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(OFFLINE) $(PY) -m pytest Testing -m "not slow"

test-all: $(STAMP)
	$(OFFLINE) $(PY) -m pytest Testing

# Semantic mutation check (not part of test): exit 1 if any mutant survives.
mutants: $(STAMP)
	$(OFFLINE) $(PY) Testing/mutants.py $(MUTANT_ARGS)

bench: $(STAMP)
	$(OFFLINE) $(PY) -m RetrievalSegLib.benchmarks.latency $(BENCH_ARGS)

# GPU machines without this .venv: python -m RetrievalSegLib.benchmarks.volume (no SimpleITK, no faiss).
bench-volume: $(STAMP)
	$(OFFLINE) $(PY) -m RetrievalSegLib.benchmarks.volume $(BENCH_ARGS)

bench-bank: $(STAMP)
	OMP_NUM_THREADS=1 $(OFFLINE) $(PY) -m RetrievalSegLib.benchmarks.bank $(BENCH_ARGS)

bench-cohort: $(STAMP)
	$(OFFLINE) $(PY) -m RetrievalSegLib.benchmarks.cohort $(BENCH_ARGS)

bench-report: $(STAMP)
	$(OFFLINE) $(PY) -m RetrievalSegLib.benchmarks.report $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

# The main job: synthetic study -> 3-slice bank -> segmentation with the real weights.
# Missing weights: it says how to get them and exits 3 (DEMO_ARGS=--yes downloads them).
demo: $(STAMP)
	$(PY) -m RetrievalSegLib.cli.demo --out demo-out $(DEMO_ARGS)
