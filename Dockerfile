# QuantLab Collector image: bin/collector in the foreground, JSON logs on stdout, SIGTERM drains.
#
#   docker build -t quantlab-collector:0.1.0 .
#   docker run --rm -p 8000:8000 -e STATUS_HOST=0.0.0.0 quantlab-collector:0.1.0 --exchanges binance
#
# Kubernetes: deploy/kubernetes/ (docs/operations.md, "Kubernetes"). Arguments after the image
# name are bin/collector's flags; `--entrypoint python ... bin/check_raw_sanity` runs the checker.
#
# The base is pinned to an exact tag and its digest (a tag can be re-pushed, a digest cannot).
# Python 3.11 is the interpreter the test suite runs on. To move on: `docker pull` the new
# exact tag, take its "Digest: sha256:..." and replace both here.
FROM python:3.11.11-slim-bookworm@sha256:081075da77b2b55c23c088251026fb69a7b2bf92471e491ff5fd75c192fd38e5

# Unbuffered stdout: every JSON log line leaves at once (supervisord sets the same). No .pyc
# written at run time: the code is compiled below, and the root filesystem is read-only under
# Kubernetes.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed uid/gid, so that volume ownership (Kubernetes fsGroup, runAsUser) can name it.
ARG UID=10001
ARG GID=10001
RUN groupadd --system --gid "${GID}" quantlab \
    && useradd --system --uid "${UID}" --gid quantlab --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin quantlab

WORKDIR /opt/quantlab

# Runtime dependencies only (requirements-dev.txt is for tests and benchmarks). Wheels exist for
# every one of them on this base: no compiler in the image.
COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY app/ ./app/
COPY bin/ ./bin/
# Compiled once here; data_dir (./data by default, a volume under Kubernetes) belongs to the user.
RUN python -m compileall -q app bin \
    && mkdir -p /opt/quantlab/data /var/lib/quantlab \
    && chown quantlab:quantlab /opt/quantlab/data /var/lib/quantlab

USER 10001:10001

# The status API (GET /status, /healthz, /metrics): status_port, 8000 by default. It listens on
# 127.0.0.1 unless status_host says otherwise (0.0.0.0 in a container that is probed or scraped).
EXPOSE 8000
# SIGTERM drains (sockets closed, queue written, Parquet finished, uploads up to
# upload_stop_timeout) and exits 0; give the runtime's stop timeout room for it (300 s).
STOPSIGNAL SIGTERM
# No HEALTHCHECK: the status port comes from settings.ini, the environment or a flag, which the
# image cannot know; Kubernetes probes /healthz and /status itself (deploy/kubernetes/).

ENTRYPOINT ["python", "bin/collector"]
