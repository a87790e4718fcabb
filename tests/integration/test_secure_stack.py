"""The secured local Kafka (`stack up --secure`) against real clients.

One secured node for the module, alone (no Phoenix, no MLflow), on ports of its own (38092 for
SASL_SSL, 38099 for mutual TLS) and a state folder of its own. Every client is an aiokafka one
built from `aiokafka_security_options`, as the worker's are, from the settings the stack hands
out; the tests run in file order, and the last ones restart the node and switch the folder to
plaintext.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError
from dotenv import dotenv_values

from processor.kafka_security import aiokafka_security_options
from processor.settings import KafkaClientSettings, StackSettings
from processor.stack import LocalStack

pytestmark = pytest.mark.integration

PORTS = {
    "kafka_port": 38092,
    "kafka_controller_port": 38093,
    "kafka_mtls_port": 38099,
    # Not started; set so that nothing defaults to another stack's ports.
    "phoenix_port": 38106,
    "phoenix_grpc_port": 38107,
    "mlflow_port": 38108,
}
_topics = itertools.count()


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("secure-stack")


@pytest.fixture(scope="module")
def secure_kafka(state_dir: Path) -> Iterator[LocalStack]:
    stack = LocalStack(
        StackSettings.model_validate(
            {"dir": state_dir, "kafka_secure": True, "start_timeout_s": 300, **PORTS}
        )
    )
    try:
        stack.up(("kafka",))
        yield stack
    finally:
        stack.down(("kafka",))


def _settings(
    stack: LocalStack, *, mutual_tls: bool = False, **changes: str
) -> KafkaClientSettings:
    """The stack's client settings with ``changes`` (by variable name) made to them."""
    return KafkaClientSettings.model_validate(
        {**stack.kafka_client_env(mutual_tls=mutual_tls), **changes}
    )


def _client_options(settings: KafkaClientSettings) -> dict[str, object]:
    return {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "request_timeout_ms": 10_000,
        **aiokafka_security_options(settings),
    }


async def _round_trip(settings: KafkaClientSettings, payload: bytes) -> bytes:
    """Create a topic, produce ``payload`` to it and consume it back in a group."""
    topic = f"secure-{next(_topics)}"
    options = _client_options(settings)
    admin = AIOKafkaAdminClient(**options)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(**options)
    await producer.start()
    try:
        await producer.send_and_wait(topic, payload)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic, group_id=f"{topic}-group", auto_offset_reset="earliest", **options
    )
    await consumer.start()
    try:
        async with asyncio.timeout(60):
            message = await consumer.getone()
            await consumer.commit()  # the group coordinator answers over the same listener
    finally:
        await consumer.stop()
    assert message.value is not None
    return message.value


async def _metadata(settings: KafkaClientSettings) -> None:
    """Start and stop a producer: its bootstrap is the connection and authentication."""
    producer = AIOKafkaProducer(**_client_options(settings))
    try:
        async with asyncio.timeout(60):
            await producer.start()
    finally:
        await producer.stop()


def _tls_connection(port: int, context: ssl.SSLContext) -> bytes:
    """A raw TLS connection to the broker: the handshake, then a read, which is where a TLS
    1.3 server's refusal of the client's certificate arrives."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"\0\0\0\0")  # an empty Kafka frame: the broker closes the connection
        return tls.recv(1)


def test_the_secured_node_answers_the_stacks_own_health_check(
    secure_kafka: LocalStack, state_dir: Path
) -> None:
    status = secure_kafka.status()["kafka-secure"]

    assert status.running and status.healthy
    assert status.url == "127.0.0.1:38092"
    assert not (state_dir / "kafka").exists()  # its data is its own, not the plaintext node's


def test_client_env_files_hold_what_the_stack_hands_out(secure_kafka: LocalStack) -> None:
    for mutual_tls in (False, True):
        path = secure_kafka.kafka_client_env_path(mutual_tls=mutual_tls)

        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert dotenv_values(path) == secure_kafka.kafka_client_env(mutual_tls=mutual_tls)


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"])
def test_every_sasl_mechanism_produces_and_consumes_over_sasl_ssl(
    secure_kafka: LocalStack, mechanism: str
) -> None:
    settings = _settings(secure_kafka, KAFKA_SASL_MECHANISM=mechanism)

    assert asyncio.run(_round_trip(settings, mechanism.encode())) == mechanism.encode()


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "PLAIN"])
def test_a_wrong_password_is_refused(
    secure_kafka: LocalStack, mechanism: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(
        secure_kafka, KAFKA_SASL_MECHANISM=mechanism, KAFKA_SASL_PASSWORD="not-the-password"
    )

    with caplog.at_level(logging.ERROR, logger="aiokafka"), pytest.raises(KafkaConnectionError):
        asyncio.run(_metadata(settings))
    # The broker's answer to the authentication, not a connection that never came about.
    assert "SaslAuthenticationFailed" in caplog.text


def test_mutual_tls_with_the_client_certificate_produces_and_consumes(
    secure_kafka: LocalStack,
) -> None:
    settings = _settings(secure_kafka, mutual_tls=True)

    assert settings.kafka_bootstrap_servers == "127.0.0.1:38099"
    assert asyncio.run(_round_trip(settings, b"mutual")) == b"mutual"


def test_mutual_tls_without_a_client_certificate_is_refused(secure_kafka: LocalStack) -> None:
    settings = _settings(
        secure_kafka, mutual_tls=True, KAFKA_SSL_CERTIFICATE_LOCATION="", KAFKA_SSL_KEY_LOCATION=""
    )

    with pytest.raises(KafkaConnectionError):
        asyncio.run(_metadata(settings))
    # The broker's refusal, not any other failure: an alert about the certificate it lacks.
    with pytest.raises(ssl.SSLError, match=r"BAD_CERTIFICATE|CERTIFICATE_REQUIRED"):
        _tls_connection(38099, settings.kafka_ssl_context)


@pytest.mark.parametrize("mutual_tls", [False, True], ids=["sasl_ssl", "mtls"])
def test_a_client_trusting_another_ca_fails_the_handshake(
    secure_kafka: LocalStack, state_dir: Path, mutual_tls: bool
) -> None:
    other_ca = str(secure_kafka.layout.kafka_tls.other_ca)
    settings = _settings(secure_kafka, mutual_tls=mutual_tls, KAFKA_SSL_CA_LOCATION=other_ca)
    port = PORTS["kafka_mtls_port" if mutual_tls else "kafka_port"]

    with pytest.raises(KafkaConnectionError):
        asyncio.run(_metadata(settings))
    # The broker sends its CA along, which the client finds in no trusted place.
    with pytest.raises(ssl.SSLCertVerificationError, match="self-signed certificate in certif"):
        _tls_connection(port, settings.kafka_ssl_context)


def test_a_plaintext_client_gets_nowhere(secure_kafka: LocalStack) -> None:
    plaintext = KafkaClientSettings.model_validate(
        {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:38092", "KAFKA_SECURITY_PROTOCOL": "PLAINTEXT"}
    )

    with pytest.raises(KafkaError):
        asyncio.run(_metadata(plaintext))


def test_the_password_is_in_no_log_and_its_files_are_private(
    secure_kafka: LocalStack, state_dir: Path
) -> None:
    password = secure_kafka.kafka_client_env()["KAFKA_SASL_PASSWORD"]
    home = state_dir / "kafka-secure"

    logs = list((state_dir / "logs").glob("*.log"))
    assert logs
    for log in logs:
        assert password not in log.read_text(errors="replace"), log
    # The storage was formatted with the SCRAM user, and the log shows that masked.
    assert "password=***]" in secure_kafka.log_path("kafka").read_text()
    assert not (home / "format.args").exists()
    for secret in (home / "server.properties", home / "sasl-password"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_a_restart_keeps_the_certificates_and_the_user(secure_kafka: LocalStack) -> None:
    ca = secure_kafka.layout.kafka_tls.ca.read_bytes()
    before = secure_kafka.kafka_client_env()

    secure_kafka.stop("kafka")
    secure_kafka.start("kafka")

    assert secure_kafka.layout.kafka_tls.ca.read_bytes() == ca
    assert secure_kafka.kafka_client_env() == before
    settings = _settings(secure_kafka, KAFKA_SASL_MECHANISM="SCRAM-SHA-256")
    assert asyncio.run(_round_trip(settings, b"again")) == b"again"


def test_the_folder_runs_plaintext_beside_its_secured_data(
    secure_kafka: LocalStack, state_dir: Path
) -> None:
    plaintext = LocalStack(
        StackSettings.model_validate({"dir": state_dir, "start_timeout_s": 300, **PORTS})
    )
    secure_kafka.down(("kafka",))
    try:
        plaintext.up(("kafka",))
        settings = plaintext.kafka_client_settings()
        assert asyncio.run(_round_trip(settings, b"plain")) == b"plain"
    finally:
        plaintext.down(("kafka",))
    assert (state_dir / "kafka-secure" / "data" / "meta.properties").exists()
