# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Importing controlplane.api.proto_gen generates the gRPC code from proto/ (proto/README.md);
# doing it here makes a broken generator fail the install, not the first command that needs it.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/python -c 'import controlplane.api.proto_gen'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tasklane demo

lint: $(STAMP)
	$(BIN)/ruff check controlplane tests bench demo

test: $(STAMP) lint
	$(BIN)/pytest -n 2 tests

# Benchmarks print tables (not tests). The data-plane one needs wrk (apt-get install wrk) and
# falls back to a slower Python client, labelled as such, without it.
bench: $(STAMP)
	$(BIN)/python bench/xds_push.py
	$(BIN)/python bench/translate.py
	$(BIN)/python bench/dataplane.py

clean:
	rm -rf $(VENV) .tasklane
