# Two commands for a fresh machine: `make bench` (the benchmark suite) and `make test` (the tests).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test bench bench-quick proofs typecheck setup clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,bench,diffusers]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks

bench-quick: $(STAMP)
	$(PY) -m benchmarks --quick

proofs: $(STAMP)
	$(PY) -m proofs

# the public API's type hints, as a user's checker sees them (the packages ship py.typed)
typecheck: $(STAMP)
	$(PY) -m pip install --quiet "mypy>=1.8"
	$(PY) -m mypy --strict --follow-imports=silent examples/typed_usage.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
