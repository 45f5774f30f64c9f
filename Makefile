# QVD-py.  `make run` installs everything and runs a node; `make test` runs the checks.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export QVD_ROOT ?= /var/lib/qvd

.PHONY: run test deps-run deps-test venv pg lint typecheck pytest clean

run: deps-run venv
	$(VENV)/bin/qvd db upgrade
	$(VENV)/bin/qvd up

test: deps-test venv pg lint typecheck pytest

deps-run:
	scripts/install-deps.sh run

deps-test:
	scripts/install-deps.sh test

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

pg:
	scripts/pg-setup.sh

lint:
	$(VENV)/bin/ruff check src tests $(wildcard bench)

typecheck:
	$(VENV)/bin/mypy

pytest:
	QVD_TEST_REQUIRE_PG=1 $(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
