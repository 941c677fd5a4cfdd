# spotserve developer entry points. `make demo` and `make test` are the README's two commands.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# CPU machines take the CPU build of torch first, so nothing pulls the CUDA wheels.
# On a GPU machine: make install TORCH_SPEC='torch' (or your CUDA build).
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
EXTRAS ?= worker,operator,dev

.PHONY: install demo plan-demo test cluster lint proto bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIP_ARGS) '$(TORCH_SPEC)'
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	@if [ -f scripts/install-helm.sh ]; then bash scripts/install-helm.sh $(VENV)/bin; fi
	touch $@

demo: install
	$(VENV)/bin/spotserve demo

# What the planner decides for a large model on spot capacity (no processes started).
plan-demo: install
	@bash scripts/demo.sh $(VENV)

test: install cluster
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The tests' Kubernetes control plane (kube-apiserver, -scheduler, -controller-manager and
# etcd built from source with Go): minutes the first time, then cached under build/.
cluster:
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
