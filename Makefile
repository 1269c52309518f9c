# mnist-flow: `make run` and `make test` are all a new machine needs (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned to the builds this project is tested with; override for another platform.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
ARGS ?=
PYTEST_ARGS ?=

export MNIST_FLOW_HOME ?= $(CURDIR)/.mnist-flow
export PREFECT_HOME ?= $(MNIST_FLOW_HOME)/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_HOST ?= 127.0.0.1
export PYTHONWARNINGS ?= ignore::DeprecationWarning

.PHONY: help install run test bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | sort

install: $(VENV)/.installed  ## create .venv with everything

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: install  ## run the whole pipeline (ARGS="--dataset fashion-mnist ..." passes flow parameters)
	$(BIN)/python flows/mnist.py $(ARGS)

test: install  ## run the test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install  ## run the benchmarks and rewrite docs/benchmarks.md
	$(BIN)/python benchmarks/run_all.py

clean:  ## remove the local state (database, artifacts, data cache)
	rm -rf $(MNIST_FLOW_HOME)
