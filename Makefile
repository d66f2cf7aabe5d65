# The project's commands (contract: ../shared/DESIGN.md "Commands").
# Every target depends on `setup`, so a fresh clone needs no hand step.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# DALI's build (pyproject extras): cuda12 everywhere; cuda13 on CUDA 13 GPU hosts, in a fresh .venv
DALI ?= cuda12
STAMP := $(VENV)/.installed-$(DALI)

IMAGENET_DIR ?=
SHARDS_DIR ?= data/shards
DEMO_DIR ?= data/demo-imagenet
CONFIG ?= configs/demo.yaml
WORKERS ?=
# The demo is stored small so that a 2-core CPU trains on it in minutes; ImageNet uses the paper's 256.
DEMO_SHORTER_SIDE ?= 128
DEMO_SHARD_MB ?= 4

.PHONY: setup shards train test test-e2e lint bench cluster-up cluster-down gpu-check gpu-check-dry

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test,$(DALI)]'
	@touch $@

# ruff, configured in pyproject.toml [tool.ruff]; `$(PY) -m ruff check --fix .` applies the safe fixes.
lint: setup
	$(PY) -m ruff check .

shards: setup
ifeq ($(strip $(IMAGENET_DIR)),)
	@test -f $(DEMO_DIR)/LOC_synset_mapping.txt || $(PY) -m shards demo --out $(DEMO_DIR)
	$(PY) -m shards build --source $(DEMO_DIR) --out $(SHARDS_DIR) \
	    --shorter-side $(DEMO_SHORTER_SIDE) --shard-size-mb $(DEMO_SHARD_MB) $(if $(WORKERS),--workers $(WORKERS))
else
	$(PY) -m shards build --source $(IMAGENET_DIR) --out $(SHARDS_DIR) $(if $(WORKERS),--workers $(WORKERS))
endif

# A location is a path (made absolute: Ray workers run elsewhere) or a URI such as s3://bucket/prefix (as is).
location = $(if $(findstring ://,$(1)),$(1),$(abspath $(1)))

train: setup
	@$(if $(findstring ://,$(SHARDS_DIR)),true,test -f $(SHARDS_DIR)/stats.json) || $(MAKE) --no-print-directory shards
	$(PY) orchestration/train.py --config $(CONFIG) $(if $(filter command line environment,$(origin SHARDS_DIR)),--set shards_dir=$(call location,$(SHARDS_DIR)))

# Two tiers (docs: README "Tests"): `make test` is in-process and takes minutes; `make test-e2e`
# runs the drills on real local Ray clusters (tests/e2e/). .ci/run runs both.
test: setup
	$(PY) -m pytest -q --durations=10 tests --ignore=tests/e2e

test-e2e: setup
	$(PY) -m pytest -q --durations=10 tests/e2e

# `make bench` uses its own cached corpus; `make bench SHARDS_DIR=...` measures the user's shards;
# `make bench PEERS=1` adds SPDL, LitData and pillow-simd side by side (installed by the bench, beside .venv).
bench: setup
	$(PY) -m bench.loader $(if $(filter command line environment,$(origin SHARDS_DIR)),--shards $(SHARDS_DIR)) $(if $(PEERS),--peers)

cluster-up: setup
	@bash orchestration/cluster/local-up.sh

cluster-down: setup
	@bash orchestration/cluster/local-down.sh

# On a lent GPU machine (CUDA torch, no DALI, no registry), so not `setup`: DALI comes from the
# bundle's parts carried there (`python -m tools.gpu_bundle plan`; docs/BENCHMARKS.md "GPU check");
# writes JSON + log to $OUT.
gpu-check:
	PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) -m bench.gpu_check --out $${OUT:-runs/gpu-check}

# The same check rehearsed here: the bundle's pins for this Python (prepared once per machine)
# unpacked into a scratch site, every step in its CPU form within the same budget.
gpu-check-dry: setup
	$(PY) -m bench.gpu_check --dry --out $${OUT:-runs/gpu-check-dry}
