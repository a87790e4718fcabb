# The worker image: `docker build -t agent-trace-processor .`
#
#   docker run --rm agent-trace-processor            # trace-processor worker
#   docker run --rm agent-trace-processor loadgen --bootstrap kafka:9092 --rate 20
#
# Configuration comes from the environment (see processor/settings.py and docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    # /app comes before site-packages, so a source tree mounted on /app/processor (see
    # docker-compose.dev.yml) is what runs; in the plain image it is the same code as installed.
    PYTHONPATH=/app

WORKDIR /app

# Dependencies and package in one step: the project has no lock file to install from first.
# (README.md is the package's long description; the wildcard keeps the build going without it.)
COPY pyproject.toml README.md* ./
COPY processor ./processor
RUN pip install --no-cache-dir .

# Run as an unprivileged user; faust keeps its local table state under the working directory.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin processor \
    && chown processor:processor /app
USER processor

# The worker's /metrics, /healthz, /readyz and /status (PROCESSOR_METRICS_PORT); not published by
# docker-compose.yml, so that `--scale worker=N` works.
EXPOSE 9464

ENTRYPOINT ["trace-processor"]
CMD ["worker"]
