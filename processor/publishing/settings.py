"""Where an agent process publishes its spans, read from the environment.

The names are the worker's: ``KAFKA_BOOTSTRAP_SERVERS``, the ``KAFKA_SECURITY_PROTOCOL`` /
``KAFKA_SASL_*`` / ``KAFKA_SSL_*`` settings and ``PROCESSOR_SPANS_TOPIC``, so one environment
serves both sides. Nothing else of the worker's settings is read: an agent must not
fail to start over a worker setting it does not use.
"""

from __future__ import annotations

from pydantic import Field, ValidationError

from processor.errors import ConfigurationError
from processor.settings import KafkaClientSettings


class PublisherSettings(KafkaClientSettings):
    spans_topic: str = Field(
        default="otlp_spans", min_length=1, description="Topic the spans are published to."
    )


def load_publisher_settings() -> PublisherSettings:
    """Read and validate, or raise ConfigurationError saying what to fix."""
    try:
        return PublisherSettings()
    except ValidationError as exc:
        raise ConfigurationError.from_validation(exc) from exc
