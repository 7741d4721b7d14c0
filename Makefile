# Two entry points on a fresh machine:  `make run` (demo server)  and  `make test` (whole suite);
# `make test-fast` is `make test` without the slow (server, dvc) tests.
# torch/torchvision are pinned in pyproject.toml; pip (not uv/poetry) finds them on local disk.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test test-fast lint bench bench-quality pipeline clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,test,all]'
	touch $@

run: setup
	$(PY) -m serving.demo

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q

test-fast: lint
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) -m bench.run
	$(PY) -m bench.runtimes

# Quality side by side with anomalib (docs/quality.md "Quality"): installs the `bench` extra (anomalib) once.
bench-quality: $(VENV)/.bench-installed
	$(PY) -m bench.quality

$(VENV)/.bench-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

pipeline: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro

clean:
	rm -rf $(VENV) .pytest_cache
