# One entry point for set-up, quickstart, tests and benchmarks.
# Everything is installed into ./.venv. WHEELS may name an extra folder of prebuilt wheels
# (CI points it at ../shared/wheels so the 13-minute mmcv build is skipped).
VENV    ?= .venv
PY      := $(VENV)/bin/python
WHEELS  ?=
# The registry's standard torch build: the machine-local CPU-only torch breaks torchvision.
PIP     := env PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS="$(WHEELS)" $(PY) -m pip
PYTEST_ARGS ?=

.PHONY: install install-det quickstart test test-fast lint bench gpu-check mutation clean

install: $(VENV)/.installed
install-det: $(VENV)/.installed-det

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -U pip "setuptools>=68,<82" wheel ninja
	$(PIP) install -q -e ".[dev]"
	touch $@

# mmcv 2.1.0 must be built against the installed torch (no build isolation), with its C++ ops.
$(VENV)/.installed-det: $(VENV)/.installed
	MAX_JOBS=2 MMCV_WITH_OPS=1 $(PIP) install -q --no-build-isolation "mmcv==2.1.0"
	$(PIP) install -q -e ".[det,seg,dev]"
	$(PY) -c "import mmcv.ops, mmdet.models, mmseg.models; print('mmcv ops, mmdet and mmseg import fine')"
	touch $@

quickstart: install
	$(PY) -m orchestrator run experiments/quickstart.yaml

# The whole suite except tests that need a CUDA device (those skip themselves anyway).
test: install-det
	$(PY) -m ruff check orchestrator workloads tests benchmarks
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

test-fast: install-det
	$(PY) -m pytest -m "not gpu and not slow" $(PYTEST_ARGS)

# Mutation testing (not in CI; hours on 2 cores): [tool.mutmut] in pyproject.toml names the modules and the fast
# tests; the per-module scores go into README.md's Development section.
mutation: install-det
	$(PIP) install -q "mutmut>=3.8,<4"
	$(VENV)/bin/mutmut run --max-children 2; status=$$?; $(PY) tests/mutation_report.py; exit $$status

lint: install
	$(PY) -m ruff check orchestrator workloads tests benchmarks

bench: install
	$(PY) benchmarks/ops.py

# The prepared check for a lent GPU (no install, no network; runs with whatever python has torch when there is
# no ./.venv): gpu-marked tests, operator and model benchmarks -> benchmarks/results/gpu-check/report.md
gpu-check:
	$(if $(wildcard $(PY)),$(PY),python3) -m benchmarks.gpu_check --out benchmarks/results/gpu-check

clean:
	rm -rf $(VENV) build *.egg-info mutants
