# The two commands of the README:
#   make run    start the service on its embedded default (SQLite, development PKI, built-in hub)
#   make test   run the whole test suite (it starts its own PostgreSQL and swtpm; .ci/run
#               installs the system packages it needs)
# Both create the virtual environment .venv on first use. `make run` installs only what the
# service needs (no compiler, no TPM libraries); `make test` adds the extras the tests use.

ifndef PYTHON
PYTHON := $(shell for p in python3.13 python3.12 python3.11 python3; do \
	if $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then echo $$p; break; fi; done)
endif
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?= ./data
PYTEST_ARGS ?=

.PHONY: run test check bench clean venv venv-dev

venv: $(VENV)/.installed-run
venv-dev: $(VENV)/.installed-dev

$(VENV)/bin/python:
	@test -n "$(PYTHON)" || { echo "provisiond needs Python 3.11 or newer (python3.11 on PATH)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install -q -e .
	@touch $@

$(VENV)/.installed-dev: pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install -q -e ".[postgres,dev,tpm]"
	@touch $@ $(VENV)/.installed-run

run: venv
	$(BIN)/provisiond serve --data-dir $(DATA_DIR)

# pytest exits 5 when it collected no test: that is a failure here, never a pass.
test: venv-dev
	@$(BIN)/pytest $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$status

check: venv-dev
	$(BIN)/ruff check src tests bench samples
	$(BIN)/ruff format --check src tests bench samples
	$(BIN)/mypy

bench: venv-dev
	$(BIN)/python bench/enrollments.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
