"""Stream processor for LLM agent traces: OTLP spans from Kafka to Phoenix, rollups to MLflow."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("agent-trace-processor")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
