# embps: one image for the shard server and the `embps` command line.
#
#   docker build -t embps:0.1.0 .      (or `make image`: podman or docker, see
#   docker run --rm -p 50051:50051 -p 9091:9091 embps:0.1.0    deploy/image/build.py)
#
# The default command runs one shard (shard 0 of 1) in the container's main
# process, listening on all interfaces. Kubernetes runs one shard per pod with
# its own arguments: see deploy/k8s/ and deploy/README.md.
#
# Base image: the exact Python patch release, pinned by the multi-platform
# manifest digest (a moved tag cannot change what is built). Both stages use the
# same base, so the virtual environment's interpreter links stay valid.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1

# ---------------------------------------------------------------- builder
# Builds the project's wheel and installs it with its dependencies into a
# virtual environment. Every dependency ships manylinux wheels (numpy, numba,
# llvmlite, grpcio), so no compiler is needed. The versions are the ones the
# test suite runs with: requirements/constraints-dev.txt pins them (and the
# build backend), so two builds of one commit install the same packages.
FROM ${PYTHON_IMAGE} AS builder

# Where pip finds packages, for a build host that reaches its index through a
# mirror or a proxy with its own certificate authority: `make image` passes the
# host's pip settings (deploy/image/build.py). Unset, pip uses its defaults.
# The CA bundle comes in as a build secret: it is mounted for the one RUN that
# needs it and stays out of every layer.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_CONSTRAINT=/src/requirements/constraints-dev.txt \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# Two layers: the dependencies (pyproject.toml's list, at the pinned versions),
# then the project itself. A change to the sources rebuilds only the second.
COPY pyproject.toml ./
COPY requirements/constraints-dev.txt requirements/
RUN --mount=type=secret,id=pip-ca,required=false \
    if [ -f /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
    && python -m venv /opt/venv \
    && python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > /tmp/dependencies.txt \
    && /opt/venv/bin/pip install --no-cache-dir -r /tmp/dependencies.txt
COPY README.md ./
COPY protos/ protos/
COPY server/ server/
COPY client/ client/
RUN --mount=type=secret,id=pip-ca,required=false \
    if [ -f /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps . \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/embps --help > /dev/null

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="embps" \
      org.opencontainers.image.description="Sharded embedding parameter server" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed, non-root uid/gid (Kubernetes' runAsNonRoot needs a numeric USER).
# Writable places: checkpoints (a volume in Kubernetes) and the numba kernel
# cache; everything else may be mounted read-only.
RUN groupadd --system --gid 10001 embps \
    && useradd --system --uid 10001 --gid embps --no-create-home \
       --home-dir /var/lib/embps --shell /usr/sbin/nologin embps \
    && mkdir -p /var/lib/embps/checkpoints /var/cache/embps/numba \
    && chown -R 10001:10001 /var/lib/embps /var/cache/embps

COPY --from=builder /opt/venv /opt/venv

# NUMBA_CACHE_DIR: compiled kernels (`cache=True`) go here, not beside the
# installed sources. EMBPS_PORT: the gRPC port `embps health` checks by default;
# EMBPS_METRICS_PORT: the metrics port HEALTHCHECK probes. Keep them equal to
# `--port` and `--metrics-port` when you override the command.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NUMBA_CACHE_DIR=/var/cache/embps/numba \
    EMBPS_PORT=50051 \
    EMBPS_METRICS_PORT=9091

USER 10001:10001
WORKDIR /var/lib/embps

# 50051: gRPC (ParameterServer, grpc.health.v1.Health, reflection)
# 9091: Prometheus /metrics
EXPOSE 50051 9091

# Healthy = the shard's grpc.health.v1 status is SERVING (it reports NOT_SERVING
# while draining or restoring): `embps health --readyz` reads it from GET /readyz
# on 127.0.0.1:$EMBPS_METRICS_PORT, plain HTTP, so the same check works for a
# shard serving TLS. It exits 2 when nothing answers, which Docker reserves:
# `|| exit 1` maps every failure to 1 (unhealthy). start-period covers the first
# numba compilation of the kernels.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["/bin/sh", "-c", "embps health --readyz 127.0.0.1:${EMBPS_METRICS_PORT} --timeout 3 || exit 1"]

ENTRYPOINT ["embps"]
CMD ["serve", "--shards", "1", "--shard-id", "0", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9091"]
