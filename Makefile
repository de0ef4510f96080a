# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench soak proto image clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tasklane demo

lint: $(STAMP)
	$(BIN)/ruff check controlplane testkit tests bench demo

test: $(STAMP) lint
	$(BIN)/pytest -n 2 --durations=20 tests

# Unit and in-process tests only (no etcd, Envoy or browser): about a minute.
test-fast: $(STAMP) lint
	$(BIN)/pytest -n 2 -m "not (integration or faults or browser or e2e)" tests

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
	$(BIN)/python bench/apply.py
	$(BIN)/python bench/queues.py

# The long one: 10 minutes of mixed load on the demo chain, is RSS flat? (bench/soak.py)
soak: $(STAMP)
	$(BIN)/python bench/soak.py

# Regenerates the committed gRPC code from proto/ with the pinned generator (proto/README.md),
# in a venv of its own: its protobuf floor is older than the one the project's .venv resolves.
PROTO_TOOLS := grpcio-tools==1.74.0
proto:
	$(PYTHON) -m venv .venv-proto
	.venv-proto/bin/pip install -q '$(PROTO_TOOLS)'
	.venv-proto/bin/python proto/generate.py

# The tasklane image the Kubernetes manifests and injected sidecars name (Dockerfile).
IMAGE ?= ghcr.io/tasklane/tasklane:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
image:
	@if docker info >/dev/null 2>&1; then \
		docker build -t $(IMAGE) . ; \
	else \
		echo "make image: no Docker daemon here (docker info failed); build with: docker build -t $(IMAGE) ." >&2; \
		exit 1; \
	fi

clean:
	rm -rf $(VENV) .venv-proto .tasklane
