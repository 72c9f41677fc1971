# Two commands do all set-up on a fresh machine: `make run` (the pipeline) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
# DVC runs each stage's `python ...` through a shell: put the venv first on PATH for it.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: setup run test bench lock exp clean-venv

# Exactly the locked packages (every one with its sha256), then the project itself, editable.
$(BIN)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

# An experiment from the committed params.yaml plus the changes in S (not the previous experiment's leftovers):
#   make exp S="train.lr=0.1 train.epochs=3"
exp: setup
	DVC=$(BIN)/dvc tools/exp.sh $(S)

# After changing a pin in pyproject.toml: resolve it again and rewrite requirements.lock (minutes).
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python tools/lock.py

# Fashion-MNIST, the default data set, comes from Debian's package when we can install it; otherwise
# the download stage tries the official mirrors (or set data.source).
fashion-mnist:
	@if [ ! -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian's dataset-fashion-mnist"; \
	  (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; \
	fi

setup: $(BIN)/.installed fashion-mnist
	@test -d .dvc || (echo "no .dvc/ here: run from the repository root" && false)

run: setup
	$(BIN)/dvc repro

# The linter and formatter first (seconds), then the tests with the 15 slowest named.
test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q --durations=15

bench: setup
	$(BIN)/python bench/data.py
	$(BIN)/python bench/run.py
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/predict.py
	$(BIN)/python bench/transfer.py
	$(BIN)/python bench/photos.py
	$(BIN)/python bench/know_your_data.py
	$(BIN)/python bench/distributed.py

clean-venv:
	rm -rf $(VENV)
