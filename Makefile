# mnist-flow: `make run` and `make test` are all a new machine needs (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned to the builds this project is tested with; override for another platform.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
ARGS ?=
PYTEST_ARGS ?=
# `make test` runs the suite in this many processes (pytest-xdist, one test file per process at a time): most of
# the end-to-end time is waiting on servers, heartbeats and schedules, which the other process fills with work.
# TEST_WORKERS=0 runs it in this process alone.
TEST_WORKERS ?= 2

export MNIST_FLOW_HOME ?= $(CURDIR)/.mnist-flow
export PREFECT_HOME ?= $(MNIST_FLOW_HOME)/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_API_HOST ?= 127.0.0.1
export PYTHONWARNINGS ?= ignore::DeprecationWarning

# Service targets (server, deploy, worker, serve): a local Prefect server unless PREFECT_API_URL says otherwise.
PREFECT_SERVER_API_PORT ?= 4200
# The work pool deployments/prefect.yaml names.
WORK_POOL := mnist
SERVICE_API_URL = $(or $(PREFECT_API_URL),http://127.0.0.1:$(PREFECT_SERVER_API_PORT)/api)
# Flow-run heartbeats (seconds; Prefect's minimum is 30) sent by the runs `make worker` starts, and the
# silence after which `make deploy`'s zombie automation marks a run Crashed (docs/service.md).
PREFECT_FLOWS_HEARTBEAT_FREQUENCY ?= 30
ZOMBIE_SECONDS ?= 90
# Extra options of `prefect worker start`, e.g. WORKER_ARGS="--limit 1" (one flow run at a time).
WORKER_ARGS ?=

.PHONY: help install run test lint bench clean server deploy worker serve serve-model

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
	mkdir -p "$$PREFECT_HOME"
	$(BIN)/python flows/mnist.py $(ARGS)

server: install  ## start a Prefect server on 127.0.0.1:$PREFECT_SERVER_API_PORT (4200), analytics off
	mkdir -p "$$PREFECT_HOME"
	$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_SERVER_API_PORT) --analytics-off

deploy: install  ## create the work pool if missing, deploy deployments/prefect.yaml, create/update the automations
	mkdir -p "$$PREFECT_HOME"
	export PREFECT_API_URL="$(SERVICE_API_URL)"; \
	  $(BIN)/prefect work-pool inspect $(WORK_POOL) >/dev/null 2>&1 \
	  || $(BIN)/prefect work-pool create $(WORK_POOL) --type process
	cd "$(CURDIR)" && PWD="$(CURDIR)" PREFECT_API_URL="$(SERVICE_API_URL)" \
	  $(BIN)/prefect deploy --prefect-file deployments/prefect.yaml --all --no-prompt
	PREFECT_API_URL="$(SERVICE_API_URL)" $(BIN)/python flows/automations.py --zombie-seconds $(ZOMBIE_SECONDS)

worker: install  ## start a process worker polling the work pool (WORK_POOL=mnist)
	mkdir -p "$$PREFECT_HOME"
	PREFECT_API_URL="$(SERVICE_API_URL)" PREFECT_FLOWS_HEARTBEAT_FREQUENCY=$(PREFECT_FLOWS_HEARTBEAT_FREQUENCY) \
	  $(BIN)/prefect worker start --pool $(WORK_POOL) --type process $(WORKER_ARGS)

serve: install  ## serve the deployments of deployments/prefect.yaml in one process, no work pool
	mkdir -p "$$PREFECT_HOME"
	PREFECT_API_URL="$(SERVICE_API_URL)" $(BIN)/python flows/serve.py

serve-model: install  ## the champion as an HTTP API on http://127.0.0.1:8000 (mnist-flow serve; ARGS="--port 9000")
	$(BIN)/mnist-flow serve $(ARGS)

test: install  ## run the test suite
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: install  ## ruff (lint; format check of src and flows) and mypy on src/ and flows/
	$(BIN)/ruff check src flows tests benchmarks scripts
	$(BIN)/ruff format --check src flows
	$(BIN)/mypy

bench: install  ## run the benchmarks and rewrite docs/benchmarks.md
	$(BIN)/python benchmarks/run_all.py

clean:  ## remove the local state (database, artifacts, data cache)
	rm -rf $(MNIST_FLOW_HOME)
