# `make run` runs the embedded default (2 rounds, built-in tiny Llama, CPU); `make test` runs the tests.
# Both create .venv with the CPU build of torch first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test setup stubs clean

$(BIN)/reinstruct: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/reinstruct

setup: $(BIN)/reinstruct

run: setup
	$(BIN)/reinstruct run --config configs/local.yaml

test: setup
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q tests

stubs: setup
	$(BIN)/python -m services.api.codegen

clean:
	rm -rf $(VENV) runs
