# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench soak clean

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

# Benchmarks print tables (not tests): every one that finishes in a few minutes on 2 cores,
# ~10 min in all (xDS push and data plane ~3 min each, the rest 1-2 min). The data-plane one
# needs wrk (apt-get install wrk) and falls back to a slower Python client, labelled as such,
# without it.
bench: $(STAMP)
	$(BIN)/python bench/xds_push.py
	$(BIN)/python bench/translate.py
	$(BIN)/python bench/dataplane.py
	$(BIN)/python bench/scaler.py
	$(BIN)/python bench/resume.py

# The long one: 10 minutes of mixed load on the demo chain, is RSS flat? (bench/soak.py)
soak: $(STAMP)
	$(BIN)/python bench/soak.py

clean:
	rm -rf $(VENV) .tasklane
