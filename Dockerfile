# syntax=docker/dockerfile:1
#
# The tierproxy sidecar image: the wheel is built in one stage and installed, with the
# production dependencies of pyproject.toml only (no embedded servers, no dev tools, no pip),
# into a virtualenv that the slim final stage copies and runs as an unprivileged user.
#
#   docker build -t tierproxy:0.1.0 .
#   docker run --rm -e TIERPROXY_REDIS_URL=redis://redis:6379/0 \
#     -e TIERPROXY_POSTGRES_URL=postgresql://app:secret@pg:5432/chat \
#     -e TIERPROXY_CLICKHOUSE_URL=http://default:@clickhouse:8123/default tierproxy:0.1.0
#
# The three URLs are required: without the embedded extra, `serve` with an empty URL stops
# and names the missing package. The API listens on 127.0.0.1:8750, the pod's loopback (only
# containers of the same pod are clients); metrics and probes on 0.0.0.0:9750. Outside a pod
# (docker run -p) pass `serve --host 0.0.0.0` to reach the API.
# tests/test_image.py lints this file and replays the build stage without a container engine.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps everything else out of the context).
COPY pyproject.toml ./
COPY proxy ./proxy
# The venv gets no pip of its own: the base image's pip installs into it (--python).
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && python -m venv --without-pip /opt/tierproxy \
    && pip --python /opt/tierproxy/bin/python install --no-cache-dir /wheels/tierproxy-*.whl

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="tierproxy" \
      org.opencontainers.image.description="Write-behind storage sidecar: HTTP/WebSocket API on Redis, batched to PostgreSQL and ClickHouse" \
      org.opencontainers.image.version="0.1.0"
# The uid/gid the Helm chart runs it as. USER is numeric so the kubelet can check
# runAsNonRoot without a runAsUser.
RUN groupadd --system --gid 10001 tierproxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin tierproxy
COPY --from=build /opt/tierproxy /opt/tierproxy
# Bytecode was compiled at install time; nothing is written at run time (read-only root
# filesystems work), and logs are not buffered.
ENV PATH=/opt/tierproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /opt/tierproxy
USER 10001:10001
EXPOSE 8750 9750
# No curl in the slim image: Python asks the metrics port (TIERPROXY_METRICS_PORT, as the
# sidecar reads it) for /healthz. Kubernetes ignores this and uses the chart's probes.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TIERPROXY_METRICS_PORT', '9750'), timeout=2)"]
ENTRYPOINT ["tierproxy"]
CMD ["serve"]
