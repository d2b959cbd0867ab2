# Two entry points: `make demo` (whole pipeline on the embedded demo data) and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)

export NO_ALBUMENTATIONS_UPDATE := 1
export DVC_NO_ANALYTICS := 1
export PATH := $(BIN):$(PATH)

.PHONY: demo test test-bench test-fast lint bench install clean-demo parallel dist bundle

install: $(STAMP)

# pip (not uv) because pip on this image resolves torch from the local wheel store; the lock pins
# every transitive version, the editable install adds only the project itself.
# pip compiles each installed module to bytecode one file at a time (half the install); compileall does the
# same on every core. The one module it skips is written for Python 3.12 (pip skips it too).
$(STAMP): requirements.lock pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-deps --no-compile -r requirements.lock 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	$(BIN)/python -m compileall -q -j 0 -x 'torch/testing/_internal/py312_intrinsics\.py' $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	rm -f $(VENV)/.installed-*
	touch $@

demo: install
	dvc repro
	dvc metrics show

# Two workers (this machine's cores); a test file stays on one worker, so its module fixtures run once.
# Files go out in collection order, the longest first (tests/conftest.py), not xdist's most-tests-first.
# The product's tests; the bench/ scripts' end-to-end runs are `make test-bench` (CI runs both).
test: install
	pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not bench"

test-bench: install
	pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m bench

# `dvc repro` with the train and oof stages one per device: make parallel DEVICES=0,1,2,3 (or cpu,cpu).
DEVICES ?= cpu
parallel: install
	python -m pipeline parallel --devices $(DEVICES)

# trashseg as a wheel in dist/, for an offline notebook: pip install --no-deps dist/trashseg-*.whl
dist: install
	rm -rf build dist
	python -m pip wheel --quiet --no-deps --no-build-isolation -w dist .
	rm -rf build

# The fitted ensemble as an offline bundle: bundle/ and bundle.zip (python -m pipeline predict-bundle).
BUNDLE ?= bundle
bundle: install
	python -m pipeline export $(BUNDLE)

# The unit tests only: the `slow` ones (real stages under dvc, real training runs) are left out.
test-fast: install
	pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow and not bench"

lint: install
	ruff check .
	ruff format --check .

BENCHMARKS := elastic loader codec metrics calibration predict native cpu_precision train_gpu

bench: install
	for b in $(BENCHMARKS); do echo "== bench/$$b.py"; python bench/$$b.py; done
