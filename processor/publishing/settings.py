"""Where an agent process publishes its spans, read from the environment.

The names are the worker's: ``KAFKA_BOOTSTRAP_SERVERS`` and ``PROCESSOR_SPANS_TOPIC``, so one
environment serves both sides. Nothing else of the worker's settings is read: an agent must not
fail to start over a worker setting it does not use.
"""

from __future__ import annotations

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from processor.errors import ConfigurationError


class PublisherSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PROCESSOR_", env_file=".env", extra="ignore", populate_by_name=True
    )

    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "kafka_bootstrap_servers"),
        description="Kafka brokers, comma-separated host:port.",
    )
    spans_topic: str = Field(
        default="otlp_spans", min_length=1, description="Topic the spans are published to."
    )

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _servers_look_like_host_port(cls, value: str) -> str:
        for server in value.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(
                    f"expected host:port[,host:port...], got {value!r}; "
                    "set KAFKA_BOOTSTRAP_SERVERS like 127.0.0.1:9092"
                )
        return value


def load_publisher_settings() -> PublisherSettings:
    """Read and validate, or raise ConfigurationError saying what to fix."""
    try:
        return PublisherSettings()
    except ValidationError as exc:
        raise ConfigurationError.from_validation(exc) from exc
