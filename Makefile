# Two commands on a fresh machine:
#   make pipeline   set everything up and run the whole pipeline on the embedded default
#   make test       set everything up and run lint + the test suite
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
# pip on this kind of machine warns about every missing local index folder; keep real errors.
QUIET_PIP := 2>&1 | { grep -v '^WARNING: Location' || true; }
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build by default. On a GPU cluster install the CUDA build of the same torch version into
# the venv first and run `make setup TORCH_SPEC=`, which then keeps it.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup setup-dev lock pipeline test test-deps test-fast lint bench mutation clean

# uv installs the ~200 locked packages in seconds where pip took minutes. torch comes from pip
# (which finds this machine's local CPU wheel; uv would not); uv then keeps it, as 2.13.0+cpu
# satisfies the lock's torch==2.13.0. Both compile bytecode at install time: left to first import,
# a dozen processes starting at once (Ray workers, servers) all compile the same modules.
UV_SPEC ?= uv==0.13.9

$(BIN)/vae-pipeline: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(UV_SPEC)" $(QUIET_PIP)
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/pip install -q "$(TORCH_SPEC)" $(QUIET_PIP); fi
	$(BIN)/uv pip install --python $(BIN)/python -q --compile-bytecode -c requirements.lock -e .
	$(BIN)/python -c "import torch, ray, mlflow, dvc, webdataset, prefect"
	touch $@

# What the tests and linters add: the s3 extra (the object-store tests), moto, pytest, ruff...
$(VENV)/.dev-installed: $(BIN)/vae-pipeline requirements-dev.lock
	$(BIN)/uv pip install --python $(BIN)/python -q --compile-bytecode -c requirements-dev.lock -e ".[s3,dev]"
	touch $@

setup: $(BIN)/vae-pipeline
setup-dev: $(VENV)/.dev-installed

# The three locks, from pyproject.toml and infra/docker/worker.in. uv keeps every pin the lock
# already has unless pyproject's ranges exclude it; `make lock UPGRADE=--upgrade` moves them all.
# The CUDA libraries torch's default wheel needs are pinned too; a CPU install never reads them.
# requirements.lock: the dependencies, plus the s3 extra's pins (installed only when asked for).
# requirements-dev.lock: the same pins, plus the dev and mutation extras.
# requirements-worker.lock: the Ray worker image (infra/docker/Dockerfile), same pins again.
LOCK := $(BIN)/uv pip compile -q --python-version 3.11 --no-annotate --custom-compile-command "make lock" $(UPGRADE)
lock: setup
	$(LOCK) pyproject.toml --extra s3 -o requirements.lock
	$(LOCK) pyproject.toml --extra s3 --extra dev --extra mutation -c requirements.lock -o requirements-dev.lock
	$(LOCK) infra/docker/worker.in -c requirements.lock -o requirements-worker.lock

pipeline: setup
	$(BIN)/vae-pipeline retrain

lint: setup-dev
	$(BIN)/ruff check vae pipelines tests benchmarks infra
	$(BIN)/ruff format --check vae pipelines tests benchmarks infra
	$(BIN)/lint-imports

# pytest workers (pytest-xdist; groups and their order: tests/conftest.py). Two roughly halve
# the suite on 2 cores. The process-kill fault test once flaked with two: its re-run started
# while Ray was still freeing the killed driver's workers (the cluster's only CPUs) and ran out
# of its 300 s; it now waits for them and has 540 s. `make test PYTEST_WORKERS=0` runs one.
PYTEST_WORKERS ?= 2

# What the tests need beyond the venv, installed from Debian when missing: PostgreSQL's programs
# (the multi-host test runs MLflow on PostgreSQL) and real Fashion-MNIST (dataset-fashion-mnist,
# the real-data tests and benchmarks); iproute2 and util-linux come with the base.
test-deps:
	@missing=""; \
	if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		missing="$$missing postgresql"; fi; \
	if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
		missing="$$missing dataset-fashion-mnist"; fi; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

test: lint test-deps
	$(BIN)/pytest -q -n $(PYTEST_WORKERS)

# The inner loop: unit, science and reliability tests that start no servers, no Ray cluster and
# no DVC (everything not marked slow), on the same pytest workers as `make test`. Timings:
# docs/benchmarks.md.
test-fast: setup-dev
	$(BIN)/ruff check vae pipelines tests benchmarks infra
	$(BIN)/lint-imports
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) -m "not slow"

# Mutation testing of vae/ and the pure logic of pipelines/ (which files: [tool.mutmut] in
# pyproject.toml) against the fast tests; results stay in mutants/ so a re-run only checks what
# changed. benchmarks/mutation_score.py prints the score per area as JSON. Not part of `make test`.
# One torch thread per child: two children on two cores would otherwise fight over four threads.
MUTATION_CHILDREN ?= 2
mutation: setup-dev
	$(BIN)/uv pip install --python $(BIN)/python -q -c requirements-dev.lock -e ".[s3,dev,mutation]"
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/mutmut run --max-children $(MUTATION_CHILDREN) > mutants.log 2>&1 \
		|| { tail -c 4000 mutants.log; exit 1; }
	$(BIN)/python benchmarks/mutation_score.py
	$(BIN)/python benchmarks/constant_mutants.py

bench: setup
	$(BIN)/python benchmarks/model_quality.py

clean:
	rm -rf $(VENV) outputs runs mutants mutants.log
