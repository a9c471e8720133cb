# One entry point for every check: `make check` = lint + types + tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: deps system-deps test lint typecheck check demo bench-receiver clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,dev]'
	touch $@

system-deps:
	@scripts/ensure-system-deps.sh

deps: $(VENV)/.installed system-deps

# pytest exits 5 when it collects nothing; make then fails, as it should: an empty suite is
# not a green one. Coverage of the whole suite (subprocesses included, see [tool.coverage] in
# pyproject.toml) must reach fail_under; a run of a few files (PYTEST_ARGS=tests/x.py) cannot,
# so run those with .venv/bin/pytest directly.
test: deps
	$(BIN)/pytest --cov=mt5backupd --cov-report=term-missing:skip-covered $(PYTEST_ARGS)

lint: deps
	$(BIN)/ruff check .

typecheck: deps
	$(BIN)/mypy

check: lint typecheck test

demo: deps
	$(BIN)/mt5backupd demo

bench-receiver: deps
	$(BIN)/python bench/receiver.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
