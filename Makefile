# Set-up and entry points. Every target creates .venv on first use (CPU torch 2.13.0, never CUDA wheels).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DSOM_DATA ?= $(abspath ../shared/data)
export DSOM_DATA

.PHONY: setup run test test-quick lint clean

$(BIN)/.dsom-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,pykeen,features,report,track]'
	touch $@

setup: $(BIN)/.dsom-installed

run: setup
	$(BIN)/dsom run $(ARGS)

lint: setup
	$(BIN)/ruff check src tests benchmarks tools

test: lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# the development subset: everything but the tests marked slow (make test runs them all)
test-quick: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
