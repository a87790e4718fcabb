"""The one place where configuration is read.

Settings come from the environment (and an optional ``.env`` file). Names shared with the
ecosystem keep their usual spelling (``KAFKA_BOOTSTRAP_SERVERS``, ``MLFLOW_TRACKING_URI``,
``PHOENIX_COLLECTOR_ENDPOINT``, ...); the processor's own settings share the ``PROCESSOR_``
prefix, the local stack's ``STACK_``. Settings are read once at start-up, validated, and passed
down; core code never reads the environment.
"""

from __future__ import annotations

import ssl
import tempfile
from pathlib import Path
from typing import Literal, Self

from pydantic import (
    AliasChoices,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from processor.alert_rules import AlertRule, load_alert_rules
from processor.core.pricing import PriceTable, load_own_prices
from processor.core.sampling import SamplingPolicy
from processor.core.semconv import MODEL_DIMENSION
from processor.errors import ConfigurationError
from processor.kafka_security import (
    SASL_PROTOCOLS,
    TLS_PROTOCOLS,
    SaslMechanism,
    SecurityProtocol,
    build_ssl_context,
)

Role = Literal["aggregate", "finalize", "forward"]
ROLES: tuple[Role, ...] = ("aggregate", "finalize", "forward")


class KafkaClientSettings(BaseSettings):
    """Where Kafka is: shared by the worker and the agents' publisher, one environment for both."""

    model_config = SettingsConfigDict(
        env_prefix="PROCESSOR_", env_file=".env", extra="ignore", populate_by_name=True
    )

    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "kafka_bootstrap_servers"),
        description="Kafka brokers, comma-separated host:port.",
    )

    kafka_security_protocol: SecurityProtocol = Field(
        default="PLAINTEXT",
        validation_alias=AliasChoices("KAFKA_SECURITY_PROTOCOL", "kafka_security_protocol"),
        description="How clients talk to the brokers: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.",
    )
    kafka_sasl_mechanism: SaslMechanism | None = Field(
        default=None,
        validation_alias=AliasChoices("KAFKA_SASL_MECHANISM", "kafka_sasl_mechanism"),
        description="SASL mechanism with a SASL_* protocol: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.",
    )
    kafka_sasl_username: str | None = Field(
        default=None,
        validation_alias=AliasChoices("KAFKA_SASL_USERNAME", "kafka_sasl_username"),
        description="SASL user name.",
    )
    kafka_sasl_password: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("KAFKA_SASL_PASSWORD", "kafka_sasl_password"),
        description="SASL password. Never logged.",
    )
    kafka_ssl_ca_location: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("KAFKA_SSL_CA_LOCATION", "kafka_ssl_ca_location"),
        description="PEM file of the CA(s) that signed the brokers' certificates; unset: the "
        "system's trusted CAs.",
    )
    kafka_ssl_certificate_location: Path | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "KAFKA_SSL_CERTIFICATE_LOCATION", "kafka_ssl_certificate_location"
        ),
        description="PEM client certificate, for brokers that require mutual TLS.",
    )
    kafka_ssl_key_location: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("KAFKA_SSL_KEY_LOCATION", "kafka_ssl_key_location"),
        description="PEM private key of the client certificate.",
    )
    kafka_ssl_key_password: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("KAFKA_SSL_KEY_PASSWORD", "kafka_ssl_key_password"),
        description="Password of an encrypted client key. Never logged.",
    )
    kafka_ssl_endpoint_identification_algorithm: Literal["https", "none"] = Field(
        default="https",
        validation_alias=AliasChoices(
            "KAFKA_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM",
            "kafka_ssl_endpoint_identification_algorithm",
        ),
        description="`https`: a broker's certificate must name the host connected to; "
        "`none` skips that check (the certificate must still be trusted).",
    )
    _ssl_context: ssl.SSLContext | None = PrivateAttr(default=None)

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

    @field_validator(
        "kafka_sasl_mechanism",
        "kafka_sasl_username",
        "kafka_sasl_password",
        "kafka_ssl_ca_location",
        "kafka_ssl_certificate_location",
        "kafka_ssl_key_location",
        "kafka_ssl_key_password",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # Compose files pass KAFKA_SASL_USERNAME=${KAFKA_SASL_USERNAME:-}: empty means unset.
        return None if value == "" else value

    @model_validator(mode="after")
    def _security_is_consistent(self) -> Self:
        protocol = self.kafka_security_protocol
        sasl = {
            "KAFKA_SASL_MECHANISM": self.kafka_sasl_mechanism,
            "KAFKA_SASL_USERNAME": self.kafka_sasl_username,
            "KAFKA_SASL_PASSWORD": self.kafka_sasl_password,
        }
        tls = {
            "KAFKA_SSL_CA_LOCATION": self.kafka_ssl_ca_location,
            "KAFKA_SSL_CERTIFICATE_LOCATION": self.kafka_ssl_certificate_location,
            "KAFKA_SSL_KEY_LOCATION": self.kafka_ssl_key_location,
            "KAFKA_SSL_KEY_PASSWORD": self.kafka_ssl_key_password,
        }
        if protocol in SASL_PROTOCOLS:
            missing = [name for name, value in sasl.items() if not value]
            if missing:
                raise ValueError(
                    f"KAFKA_SECURITY_PROTOCOL={protocol} needs {' and '.join(missing)} "
                    "(mechanism PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)"
                )
        else:
            stray = [name for name, value in sasl.items() if value]
            if stray:
                raise ValueError(
                    f"{', '.join(stray)} set but KAFKA_SECURITY_PROTOCOL={protocol} does not use "
                    "SASL: set it to SASL_SSL (or SASL_PLAINTEXT), or unset them"
                )
        if protocol in TLS_PROTOCOLS:
            if self.kafka_ssl_key_location and not self.kafka_ssl_certificate_location:
                raise ValueError(
                    "KAFKA_SSL_KEY_LOCATION set without KAFKA_SSL_CERTIFICATE_LOCATION: name the "
                    "client certificate the key belongs to"
                )
            if self.kafka_ssl_key_password and not self.kafka_ssl_certificate_location:
                raise ValueError("KAFKA_SSL_KEY_PASSWORD set without a client certificate and key")
            self._ssl_context = build_ssl_context(
                ca_location=self.kafka_ssl_ca_location,
                certificate_location=self.kafka_ssl_certificate_location,
                key_location=self.kafka_ssl_key_location,
                key_password=(
                    self.kafka_ssl_key_password.get_secret_value()
                    if self.kafka_ssl_key_password
                    else None
                ),
                check_hostname=self.kafka_ssl_endpoint_identification_algorithm == "https",
            )
        else:
            stray = [name for name, value in tls.items() if value]
            if stray:
                raise ValueError(
                    f"{', '.join(stray)} set but KAFKA_SECURITY_PROTOCOL={protocol} does not use "
                    "TLS: set it to SSL or SASL_SSL, or unset them"
                )
        return self

    @property
    def kafka_ssl_context(self) -> ssl.SSLContext:
        """The TLS context of every client; only with KAFKA_SECURITY_PROTOCOL SSL or SASL_SSL."""
        if self._ssl_context is None:
            raise ValueError(f"KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} uses no TLS")
        return self._ssl_context


class WorkerSettings(KafkaClientSettings):
    """Everything a worker process needs."""

    mlflow_tracking_uri: str = Field(
        default="http://127.0.0.1:5000",
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "mlflow_tracking_uri"),
        description="MLflow tracking server the rollups are written to.",
    )
    mlflow_experiment_name: str = Field(
        default="agent-rollups",
        validation_alias=AliasChoices("MLFLOW_EXPERIMENT_NAME", "mlflow_experiment_name"),
        description="MLflow experiment holding the per-agent runs (created when missing).",
    )
    phoenix_collector_endpoint: str = Field(
        default="http://127.0.0.1:6006",
        validation_alias=AliasChoices("PHOENIX_COLLECTOR_ENDPOINT", "phoenix_collector_endpoint"),
        description="Phoenix base URL; spans are POSTed to <endpoint>/v1/traces.",
    )
    phoenix_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("PHOENIX_API_KEY", "phoenix_api_key"),
        description="Phoenix API key, sent as a bearer token. Never logged.",
    )
    phoenix_project: str = Field(
        default="default",
        description="Phoenix project for spans whose resource names none.",
    )

    app_id: str = Field(
        default="agent-trace-processor",
        description="Consumer group and faust application id; workers sharing it share work.",
    )
    spans_topic: str = Field(default="otlp_spans", description="Topic the agents publish to.")
    dead_letter_topic: str = Field(
        default="otlp_spans.dlq", description="Where undecodable or invalid input goes."
    )
    partials_topic: str = Field(
        default="agent_rollups.partial",
        description="Topic of partial window aggregates, from aggregate to finalize.",
    )
    summaries_topic: str = Field(
        default="agent_rollups.summary",
        description="Compacted topic of each series' day and hour so far, kept by finalize.",
    )
    sampled_topic: str = Field(
        default="otlp_spans.sampled",
        description="Topic of the kept (sampled) spans, from aggregate to forward.",
    )
    sampled_partitions: int = Field(
        default=4, ge=1, description="Partitions of the sampled topic when the worker creates it."
    )
    sampled_retention_ms: int = Field(
        default=7 * 24 * 3600 * 1000,
        ge=60_000,
        description=(
            "Retention of the sampled topic: how long Phoenix may be away before kept spans "
            "are lost (counted in trace_processor_forward_records_lost_total)."
        ),
    )
    roles: list[Role] = Field(
        default=list(ROLES),
        description=(
            "Roles this worker runs (JSON list, or `--roles` comma-separated): aggregate "
            "(with the repartition), finalize, forward."
        ),
    )
    spans_partitions: int = Field(
        default=4, ge=1, description="Partitions of the spans topic when the worker creates it."
    )
    repartition_by_trace_id: bool = Field(
        default=False,
        description=(
            "Set when producers do not key messages by trace id (a Collector's Kafka exporter "
            "without partition_traces_by_id): messages are split per trace and rekeyed through "
            "the repartition topic before trace assembly."
        ),
    )
    repartition_topic: str | None = Field(
        default=None,
        description=(
            "Topic of the repartition by trace id, with as many partitions as the spans topic "
            "[default: the spans topic + `.by_trace_id`]."
        ),
    )
    partials_partitions: int = Field(
        default=4, ge=1, description="Partitions of the partials topic when the worker creates it."
    )
    replication_factor: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Replication factor of topics the worker creates; unset: 3, or the brokers in the "
            "cluster when it has fewer (counted when the topics are created: set it on a "
            "cluster where a broker may be down then)."
        ),
    )
    min_insync_replicas: int | None = Field(
        default=None,
        ge=1,
        description=(
            "`min.insync.replicas` of topics the worker creates: replicas that must hold a "
            "write before Kafka acknowledges it (the worker produces with acks=all); at most "
            "the replication factor; unset: 2 from 3 replicas up, else 1."
        ),
    )
    max_traces: int = Field(
        default=10_000, ge=1, description="Traces held at once in each partition's buffer."
    )
    max_series_per_window: int = Field(
        default=1_000,
        ge=1,
        description="Series (agent x dimensions) per window; the excess folds into __overflow__.",
    )
    dimension_attributes: list[str] = Field(
        default_factory=list,
        description="Extra rollup dimensions: span or resource attribute names (JSON list).",
    )
    agent_attributes: list[str] = Field(
        default_factory=lambda: ["agent.name", "gen_ai.agent.name"],
        description="Span attributes naming the agent, in order of preference (JSON list).",
    )
    rollup_by_model: bool = Field(
        default=False,
        description=(
            "Model as the last rollup dimension (`dimension.model`, named as the price table "
            "names it): cost and tokens per agent and model; non-LLM spans have model ''."
        ),
    )
    prices_file: Path | None = Field(
        default=None,
        description=(
            "Your own prices (JSON or TOML: model -> input, output, cache_read, cache_write "
            "USD per million tokens) for LLM spans without `llm.cost.total`; they win over "
            "genai-prices' table."
        ),
    )
    price_catalogue: bool = Field(
        default=True,
        description="Price LLM spans without a reported cost from genai-prices' table.",
    )

    alert_rules_file: str | None = Field(
        default=None,
        description=(
            "Alert rules (YAML or JSON, see the operations guide); unset: the two default "
            "rules (error rate over 5 %, p95 over 5 s, for 2 windows); `none`: no alerts."
        ),
    )
    alerts_topic: str = Field(
        default="agent_alerts", description="Topic of the alert events (JSON), keyed by event."
    )
    alert_webhook_url: str | None = Field(
        default=None, description="Also POST every alert event to this URL (optional)."
    )
    alert_webhook_format: Literal["json", "slack"] = Field(
        default="json",
        description='Webhook body: the event\'s JSON, or a Slack-compatible `{"text": ...}`.',
    )

    _price_table: PriceTable = PrivateAttr(default_factory=PriceTable)
    _alert_rules: tuple[AlertRule, ...] = PrivateAttr(default=())

    @model_validator(mode="after")
    def _alert_rules_load(self) -> Self:
        # A ValueError names the file, the rule and the field (or line) to fix.
        self._alert_rules = load_alert_rules(self.alert_rules_file)
        known = set(self.rollup_dimension_names)
        for rule in self._alert_rules:
            unknown = sorted({name for name, _ in rule.dimensions} - known)
            if unknown:
                raise ValueError(
                    f"alert rule {rule.name!r} filters on dimension(s) {', '.join(unknown)}, "
                    f"but the rollups have {', '.join(sorted(known)) or 'none'}: set "
                    "PROCESSOR_DIMENSION_ATTRIBUTES (or PROCESSOR_ROLLUP_BY_MODEL for model), "
                    "or drop the filter"
                )
        if self.alert_webhook_url is not None and not self.alert_webhook_url.startswith(
            ("http://", "https://")
        ):
            # Not echoed: a webhook URL's path is often its secret.
            raise ValueError("PROCESSOR_ALERT_WEBHOOK_URL must be an http:// or https:// URL")
        return self

    @property
    def alert_rules(self) -> tuple[AlertRule, ...]:
        """The alert rules (the file read at start-up); empty: alerting off."""
        return self._alert_rules

    @field_validator("prices_file")
    @classmethod
    def _prices_file_reads(cls, value: Path | None) -> Path | None:
        if value is not None:
            load_own_prices(value)  # a ValueError names the file and what to fix
        return value

    @model_validator(mode="after")
    def _prices_load(self) -> Self:
        own = load_own_prices(self.prices_file) if self.prices_file is not None else {}
        self._price_table = PriceTable(own, catalogue=self.price_catalogue)
        return self

    @property
    def rollup_dimension_names(self) -> list[str]:
        """The rollups' dimensions in order: the attributes, then the model if switched on."""
        return [*self.dimension_attributes, *([MODEL_DIMENSION] if self.rollup_by_model else [])]

    @property
    def price_table(self) -> PriceTable:
        """The prices for LLM spans that report no cost (the file read at start-up)."""
        return self._price_table

    window_size_ms: int = Field(
        default=60_000, ge=1_000, description="Tumbling window size in milliseconds."
    )
    allowed_lateness_ms: int = Field(
        default=5_000,
        ge=0,
        description=(
            "How far behind the newest end time a span may arrive and still count in its own "
            "window (later ones count in `late_spans`)."
        ),
    )
    idle_timeout_ms: int = Field(
        default=5_000,
        ge=100,
        description="After this long without messages a partition's watermark follows the clock.",
    )
    finalize_max_wait_ms: int = Field(
        default=60_000,
        ge=1_000,
        description="Finalize writes a window after this long even if a partition is silent.",
    )
    phoenix_batch_spans: int = Field(
        default=2_000, ge=1, description="Spans per OTLP request sent to Phoenix."
    )
    phoenix_batch_interval_ms: int = Field(
        default=1_000, ge=10, description="Longest a span waits before its batch is sent."
    )
    phoenix_enabled: bool = Field(default=True, description="Forward spans to Phoenix at all.")
    log_level: str = Field(default="info", description="Worker log level.")
    progress_log_interval_s: float = Field(
        default=10.0, gt=0, description="How often a worker logs its progress counters."
    )
    data_dir: Path = Field(
        default=Path(tempfile.gettempdir()) / "agent-trace-processor",
        description="Scratch folder for faust's local state (nothing here must survive).",
    )
    phoenix_max_in_flight: int = Field(
        default=4,
        ge=1,
        description="Requests to Phoenix out at once; beyond that forwarding waits.",
    )
    phoenix_max_spans_per_second: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Budget of spans per second sent to Phoenix in all, shared over the source "
            "partitions in event time; traces only the probability keeps are dropped whole "
            "past it (reason `budget`). Unset: no limit."
        ),
    )
    phoenix_timeout_s: float = Field(
        default=30.0, gt=0, description="Timeout of one request to Phoenix (then it is retried)."
    )
    phoenix_retry_initial_ms: int = Field(
        default=250, ge=1, description="First backoff after a failed Phoenix request."
    )
    phoenix_retry_max_ms: int = Field(
        default=10_000,
        ge=1,
        description="Longest backoff between retries of a Phoenix request (retried forever).",
    )
    phoenix_drain_timeout_s: float = Field(
        default=30.0,
        ge=0,
        description="At shutdown, how long to wait for Phoenix to accept the spans still held.",
    )
    phoenix_confirm_stored: bool = Field(
        default=True,
        description=(
            "Count a batch as delivered only once Phoenix has written it (asked through its "
            "GraphQL API), not when it answers 2xx: Phoenix drops its in-memory queue when it "
            "stops."
        ),
    )
    phoenix_confirm_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description=(
            "When Phoenix answers but writes none of the batches waited for during this long, "
            "they are sent again."
        ),
    )
    phoenix_public_url: str | None = Field(
        default=None,
        description=(
            "Phoenix UI base URL for the trace links in MLflow, as a browser reaches it; "
            "None: PHOENIX_COLLECTOR_ENDPOINT."
        ),
    )
    worker_id: str | None = Field(
        default=None,
        description="This worker's name in logs, metrics and `status`; None: <hostname>-<pid>.",
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="Log lines as plain text, or as one JSON object per line."
    )
    metrics_host: str = Field(
        default="0.0.0.0",
        description="Address of the worker's HTTP server: /metrics, /healthz, /readyz, /status.",
    )
    metrics_port: int = Field(
        default=9464,
        ge=0,
        le=65535,
        description=(
            "First port tried for the worker's HTTP server; when taken, the next free one up "
            "to 99 above; 0: any free port. The port in use is noted in the registry."
        ),
    )
    registry_dir: Path = Field(
        default=Path(tempfile.gettempdir()) / "agent-trace-processor" / "workers",
        description="Where each worker on this machine notes its HTTP address, for `status`.",
    )
    health_check_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="How often readiness checks that Phoenix and MLflow answer.",
    )

    @field_validator("phoenix_api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        # Compose files pass PHOENIX_API_KEY=${PHOENIX_API_KEY:-}: empty means "no key".
        return None if value == "" else value

    sampling_probability: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description="Share of traces sent to Phoenix at random (consistent by trace id).",
    )
    sampling_keep_errors: bool = Field(
        default=True, description="Always send traces that have a span with status ERROR."
    )
    sampling_latency_threshold_ms: int | None = Field(
        default=None, ge=0, description="Always send traces lasting at least this long."
    )
    sampling_attribute_matches: dict[str, list[str]] = Field(
        default_factory=dict,
        description='Always send traces with a span attribute among values (JSON: {"key": ["v"]}).',
    )
    sampling_agent_spans_per_second: float | None = Field(
        default=None, gt=0, description="Cap on spans per second sent to Phoenix per agent."
    )
    sampling_decision_grace_ms: int = Field(
        default=2_000, ge=0, description="A trace is decided this long after its root span ends."
    )
    sampling_decision_max_wait_ms: int = Field(
        default=30_000, ge=0, description="...or this long after its first span, at the latest."
    )
    sampling_max_buffered_spans: int = Field(
        default=200_000, ge=1, description="Spans of undecided traces held per partition."
    )

    def sampling_policy(self) -> SamplingPolicy | None:
        """The policy for Phoenix, or None when every span goes there (probability 1, no cap)."""
        if (
            self.sampling_probability >= 1.0
            and self.sampling_agent_spans_per_second is None
            and self.phoenix_max_spans_per_second is None
            and not self.sampling_attribute_matches
        ):
            return None
        budget = self.phoenix_max_spans_per_second
        # Each source partition decides alone, in its own event time: an equal share each.
        share = budget / self.spans_partitions if budget is not None else None
        try:
            return SamplingPolicy(
                probability=self.sampling_probability,
                keep_errors=self.sampling_keep_errors,
                latency_threshold_ms=self.sampling_latency_threshold_ms,
                attribute_matches={
                    key: frozenset(values)
                    for key, values in self.sampling_attribute_matches.items()
                },
                agent_spans_per_second=self.sampling_agent_spans_per_second,
                budget_spans_per_second=share,
                decision_grace_ms=self.sampling_decision_grace_ms,
                decision_max_wait_ms=self.sampling_decision_max_wait_ms,
                max_buffered_spans=self.sampling_max_buffered_spans,
                max_buffered_traces=self.max_traces,
            )
        except ValueError as exc:
            raise ConfigurationError(
                f"invalid sampling settings (PROCESSOR_SAMPLING_*): {exc}"
            ) from exc

    @field_validator("min_insync_replicas")
    @classmethod
    def _insync_within_replicas(cls, value: int | None, info: ValidationInfo) -> int | None:
        replication = info.data.get("replication_factor")
        if value is not None and replication is not None and value > replication:
            raise ValueError(
                f"{value} replicas cannot be in sync when topics have "
                f"PROCESSOR_REPLICATION_FACTOR={replication}: every write would be refused; "
                "lower it or raise the replication factor"
            )
        return value

    @field_validator("mlflow_tracking_uri", "phoenix_collector_endpoint")
    @classmethod
    def _is_http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"expected an http(s):// URL, got {value!r}")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _topics_are_distinct(self) -> WorkerSettings:
        if self.repartition_topic is None:
            self.repartition_topic = f"{self.spans_topic}.by_trace_id"
        topics = [
            self.spans_topic,
            self.dead_letter_topic,
            self.partials_topic,
            self.summaries_topic,
            self.sampled_topic,
            self.alerts_topic,
        ]
        if self.repartition_by_trace_id:
            topics.append(self.repartition_topic)
        if len(set(topics)) != len(topics):
            raise ValueError(
                "the spans, dead-letter, partials, summaries, sampled, alerts and repartition "
                "topics must all "
                f"differ, got {topics}"
            )
        if not self.roles:
            raise ValueError(f"name at least one role of {', '.join(ROLES)}")
        self.roles = [role for role in ROLES if role in self.roles]  # one order, no repeats
        return self

    @property
    def forward_group_id(self) -> str:
        """The forward role's consumer group: its own, so its lag never holds the others."""
        return f"{self.app_id}.forward"

    @property
    def aggregate_topic(self) -> str:
        """The topic trace assembly reads: the repartition topic when repartitioning."""
        if self.repartition_by_trace_id and self.repartition_topic is not None:
            return self.repartition_topic
        return self.spans_topic

    @property
    def phoenix_traces_url(self) -> str:
        base = self.phoenix_collector_endpoint
        return base if base.endswith("/v1/traces") else f"{base}/v1/traces"


class StackSettings(BaseSettings):
    """Ports and folders of the local stack (`trace-processor stack ...`)."""

    model_config = SettingsConfigDict(env_prefix="STACK_", env_file=".env", extra="ignore")

    dir: Path = Field(default=Path(".stack"), description="State folder: data, logs, pids.")
    kafka_port: int = Field(default=9092, ge=1, le=65535, description="Kafka client port.")
    kafka_controller_port: int = Field(
        default=9093, ge=1, le=65535, description="Kafka KRaft controller port."
    )
    kafka_brokers: int = Field(
        default=1,
        ge=1,
        le=5,
        description=(
            "Kafka nodes, each a broker and a KRaft controller (`stack up --brokers`); with 3 "
            "or more, internal topics get 3 replicas and `min.insync.replicas` is 2. Node n "
            "listens on STACK_KAFKA_PORT + 2(n-1) and STACK_KAFKA_CONTROLLER_PORT + 2(n-1)."
        ),
    )
    phoenix_port: int = Field(default=6006, ge=1, le=65535, description="Phoenix HTTP port.")
    phoenix_grpc_port: int = Field(
        default=4317, ge=1, le=65535, description="Phoenix OTLP gRPC port."
    )
    mlflow_port: int = Field(default=5000, ge=1, le=65535, description="MLflow HTTP port.")
    kafka_home: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("KAFKA_HOME", "kafka_home"),
        description="An unpacked Kafka distribution to use instead of the Maven-fetched jars.",
    )
    cache_dir: Path = Field(
        default=Path.home() / ".cache" / "agent-trace-processor",
        description="Where the Kafka jars fetched with Maven are kept between runs.",
    )
    start_timeout_s: float = Field(
        default=120.0, gt=0, description="How long `stack up` waits for each service."
    )
    kafka_secure: bool = Field(
        default=False,
        description=(
            "Kafka's client port speaks SASL_SSL (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512) and a "
            "second port mutual TLS (`stack up --secure`); one node only. Certificates and the "
            "password are made once in the state folder; client settings go to its client.env."
        ),
    )
    kafka_mtls_port: int = Field(
        default=9099,
        ge=1,
        le=65535,
        description="The secured Kafka's mutual-TLS port (clients present a certificate).",
    )

    @model_validator(mode="after")
    def _secure_kafka_is_one_node(self) -> Self:
        # The certificates and the SASL user would have to reach every node; one is enough to
        # try a secured client against.
        if self.kafka_secure and self.kafka_brokers > 1:
            raise ValueError(
                f"STACK_KAFKA_SECURE runs one Kafka node, but STACK_KAFKA_BROKERS is "
                f"{self.kafka_brokers}: drop --secure or --brokers"
            )
        return self


def load_worker_settings(**overrides: object) -> WorkerSettings:
    """Read and validate the worker settings, or raise ConfigurationError saying what to fix.

    ``overrides`` (command-line options) take precedence over the environment."""
    try:
        return WorkerSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigurationError.from_validation(exc) from exc


def load_kafka_client_settings(**overrides: object) -> KafkaClientSettings:
    """Read and validate where Kafka is and how to connect; ``overrides`` win."""
    try:
        return KafkaClientSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigurationError.from_validation(exc) from exc


def load_stack_settings(**overrides: object) -> StackSettings:
    """Read and validate the stack settings; ``overrides`` (command-line options) win."""
    try:
        return StackSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigurationError.from_validation(exc) from exc
