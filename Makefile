# Developer entry points; `make help` lists them. Each one first makes the virtualenv $(VENV)
# and installs natsmesh[dev] into it, when the venv is missing or pyproject.toml has changed
# since the last install.
PYTHON ?= python3
VENV   ?= .venv
ARGS   ?=

BIN   := $(VENV)/bin
PIP   := $(BIN)/python -m pip --quiet --disable-pip-version-check
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help venv demo test lint

help: ## list the targets
	@awk -F ':.*## ' '/^[a-z]+:.*## / { printf "  make %-5s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)
	@echo "  (variables: PYTHON=$(PYTHON) VENV=$(VENV) ARGS=extra arguments for test and demo)"

venv: $(STAMP) ## create the venv and install natsmesh[dev] into it, when needed

$(STAMP): pyproject.toml
	@echo "make: installing natsmesh[dev] into $(VENV)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(PIP) install --upgrade pip
	@$(PIP) install -e ".[dev]"
	@touch $@

demo: venv ## a demo mesh on an embedded NATS server (mesh-agent demo)
	$(BIN)/mesh-agent demo $(ARGS)

# pytest exits 5 when it ran no test: that is a failure here, not a success.
test: venv ## the test suite (python -m pytest); extra pytest arguments with ARGS=...
	@echo "$(BIN)/python -m pytest $(ARGS)"
	@$(BIN)/python -m pytest $(ARGS); code=$$?; \
	if [ $$code -eq 5 ]; then echo "make test: pytest ran no test (exit 5): failing" >&2; exit 1; fi; \
	exit $$code

# Every check runs, even after one fails, so that one run shows every problem.
LINTERS := "ruff check ." "ruff format --check ." "mypy" \
           "lint-imports --no-logo --cache-dir $(VENV)/.import_linter_cache"

lint: venv ## ruff check, ruff format --check, mypy and the import contracts (lint-imports)
	@failed=; for check in $(LINTERS); do \
	  echo "$(BIN)/$$check"; $(BIN)/$$check || failed="$$failed, $${check%% *}"; \
	done; \
	if [ -n "$$failed" ]; then echo "make lint: failed: $${failed#, }" >&2; exit 1; fi
