# diffmesh: every target sets up what it needs from nothing but Python.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch, pinned; a GPU torch already in the venv is left alone.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.diffmesh-installed
PROTO_SRC := $(wildcard protos/*.proto)
PROTO_OUT := $(PROTO_SRC:.proto=_pb2.py)
PYTEST_ARGS ?=
SHELL := /bin/bash

.PHONY: install protos test lint demo bench up down clean help

help:
	@echo "make install | protos | test | lint | demo | bench | up | down | clean"

install: $(STAMP)

# pip's "Location ... is ignored" warnings about this machine's extra indexes are filtered out.
PIP_QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@set -o pipefail; $(BIN)/python -c "import torch" 2>/dev/null || \
		$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(PIP_QUIET)
	@set -o pipefail; $(BIN)/python -m pip install -q -e ".[dev,local]" $(PIP_QUIET)
	@touch $(STAMP)

protos: install $(PROTO_OUT)

protos/%_pb2.py: protos/%.proto $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. $<

test: install protos
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install protos
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

demo: install protos
	$(BIN)/python -m orchestrator.stack.demo

bench: install protos
	$(BIN)/python -m bench

up: install protos
	$(BIN)/diffmesh up

down:
	@test -x $(BIN)/diffmesh && $(BIN)/diffmesh down || echo "nothing to stop (no venv)"

clean:
	rm -f protos/*_pb2.py protos/*_pb2_grpc.py protos/*_pb2.pyi
	rm -rf .pytest_cache .ruff_cache
