# Two entry points on a fresh machine:  `make run` (demo server)  and  `make test` (whole suite).
# torch/torchvision are pinned in pyproject.toml; pip (not uv/poetry) finds them on local disk.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test bench bench-quality pipeline clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,test]'
	touch $@

run: setup
	$(PY) -m bdi.demo

test: setup
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

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
