"""Kafka security settings: what fits together, what a bad file says, what each client gets."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from faust.auth import SASLCredentials, SSLCredentials

from processor.errors import ConfigurationError
from processor.kafka_security import aiokafka_security_options, faust_credentials
from processor.settings import load_kafka_client_settings, load_worker_settings
from processor.stack.kafka_tls import (
    certificate_pem,
    issue_ca,
    issue_certificate,
    private_key_pem,
)
from processor.worker.logging_setup import SecretMasker, secrets_of

NOW = datetime(2026, 12, 2, tzinfo=UTC)
PASSWORD = "s3cret-kafka-password"
SASL = {
    "kafka_security_protocol": "SASL_SSL",
    "kafka_sasl_mechanism": "SCRAM-SHA-512",
    "kafka_sasl_username": "processor",
    "kafka_sasl_password": PASSWORD,
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pki")
    ca = issue_ca("test CA", now=NOW)
    client = issue_certificate(ca, "client", now=NOW, usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
    other = issue_certificate(ca, "other", now=NOW, usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
    files = {
        "ca": certificate_pem(ca.certificate),
        "client": certificate_pem(client.certificate),
        "client-key": private_key_pem(client.key),
        "other-key": private_key_pem(other.key),
        "encrypted-key": client.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"key-pass"),
        ),
        "garbage": b"not a certificate\n",
    }
    paths = {}
    for name, data in files.items():
        paths[name] = folder / f"{name}.pem"
        paths[name].write_bytes(data)
    return paths


def _problem(**settings: object) -> str:
    with pytest.raises(ConfigurationError) as caught:
        load_kafka_client_settings(**settings)
    return str(caught.value)


def test_plaintext_is_the_default_and_needs_nothing() -> None:
    settings = load_kafka_client_settings()
    assert aiokafka_security_options(settings) == {"security_protocol": "PLAINTEXT"}
    assert faust_credentials(settings) is None


def test_sasl_without_credentials_says_which_settings_are_missing() -> None:
    problem = _problem(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="PLAIN")
    assert "KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD" in problem
    assert "KAFKA_SASL_MECHANISM" not in problem.split("needs", 1)[1]


def test_sasl_settings_with_a_protocol_without_sasl_are_refused() -> None:
    problem = _problem(kafka_security_protocol="SSL", kafka_sasl_username="processor")
    assert "KAFKA_SASL_USERNAME set but KAFKA_SECURITY_PROTOCOL=SSL" in problem


def test_tls_files_with_plaintext_are_refused(pki: dict[str, Path]) -> None:
    problem = _problem(kafka_ssl_ca_location=pki["ca"])
    assert "KAFKA_SSL_CA_LOCATION set but KAFKA_SECURITY_PROTOCOL=PLAINTEXT" in problem
    assert "SSL or SASL_SSL" in problem


def test_an_unknown_mechanism_is_refused_with_the_known_ones() -> None:
    problem = _problem(**{**SASL, "kafka_sasl_mechanism": "GSSAPI"})
    assert "kafka_sasl_mechanism" in problem and "SCRAM-SHA-512" in problem


@pytest.mark.parametrize(
    ("files", "says"),
    [
        ({"kafka_ssl_ca_location": "missing"}, "KAFKA_SSL_CA_LOCATION={missing}: no such file"),
        ({"kafka_ssl_ca_location": "garbage"}, "KAFKA_SSL_CA_LOCATION={garbage} holds no PEM CA"),
        (
            {"kafka_ssl_certificate_location": "client", "kafka_ssl_key_location": "other-key"},
            "KAFKA_SSL_KEY_LOCATION={other-key} is not the key of the certificate",
        ),
        (
            {"kafka_ssl_certificate_location": "client"},
            "KAFKA_SSL_CERTIFICATE_LOCATION={client} holds no usable certificate and private key",
        ),
        (
            {"kafka_ssl_key_location": "client-key"},
            "KAFKA_SSL_KEY_LOCATION set without KAFKA_SSL_CERTIFICATE_LOCATION",
        ),
        (
            {"kafka_ssl_certificate_location": "client", "kafka_ssl_key_location": "encrypted-key"},
            "KAFKA_SSL_KEY_PASSWORD does not decrypt the key in {encrypted-key}",
        ),
        (
            {
                "kafka_ssl_certificate_location": "client",
                "kafka_ssl_key_location": "encrypted-key",
                "kafka_ssl_key_password": "wrong",
            },
            "KAFKA_SSL_KEY_PASSWORD does not decrypt the key in {encrypted-key}",
        ),
    ],
)
def test_an_unusable_certificate_file_stops_start_up_naming_it(
    pki: dict[str, Path], tmp_path: Path, files: dict[str, str], says: str
) -> None:
    paths = {name: str(pki.get(name, tmp_path / name)) for name in files.values()}
    settings = {
        key: paths[name] if key.endswith("location") else name for key, name in files.items()
    }
    problem = _problem(kafka_security_protocol="SSL", **settings)
    expected = says
    for name, path in paths.items():
        expected = expected.replace(f"{{{name}}}", path)
    assert expected in problem, problem


def test_mutual_tls_with_an_encrypted_key_builds_one_context(pki: dict[str, Path]) -> None:
    settings = load_kafka_client_settings(
        kafka_security_protocol="SSL",
        kafka_ssl_ca_location=pki["ca"],
        kafka_ssl_certificate_location=pki["client"],
        kafka_ssl_key_location=pki["encrypted-key"],
        kafka_ssl_key_password="key-pass",
    )
    options = aiokafka_security_options(settings)
    context = options["ssl_context"]
    assert options["security_protocol"] == "SSL"
    assert context is settings.kafka_ssl_context  # one context for every client
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    # The CA named is the only one trusted, as in Kafka's own clients.
    assert [cert["subject"] for cert in context.get_ca_certs()] == [((("commonName", "test CA"),),)]
    credentials = faust_credentials(settings)
    assert isinstance(credentials, SSLCredentials) and credentials.context is context


def test_hostname_checks_can_be_turned_off_but_not_trust(pki: dict[str, Path]) -> None:
    settings = load_kafka_client_settings(
        kafka_security_protocol="SSL",
        kafka_ssl_ca_location=pki["ca"],
        kafka_ssl_endpoint_identification_algorithm="none",
    )
    assert not settings.kafka_ssl_context.check_hostname
    assert settings.kafka_ssl_context.verify_mode is ssl.CERT_REQUIRED


def test_sasl_ssl_gives_every_client_the_same_credentials(pki: dict[str, Path]) -> None:
    settings = load_kafka_client_settings(**SASL, kafka_ssl_ca_location=pki["ca"])
    options = aiokafka_security_options(settings)
    assert {key: value for key, value in options.items() if key != "ssl_context"} == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "processor",
        "sasl_plain_password": PASSWORD,
    }
    credentials = faust_credentials(settings)
    assert isinstance(credentials, SASLCredentials)
    assert credentials.protocol.value == "SASL_SSL"
    assert credentials.mechanism.value == "SCRAM-SHA-512"
    assert credentials.ssl_context is settings.kafka_ssl_context
    assert PASSWORD not in repr(credentials)


def test_sasl_plaintext_has_no_tls_context() -> None:
    settings = load_kafka_client_settings(**{**SASL, "kafka_security_protocol": "SASL_PLAINTEXT"})
    assert "ssl_context" not in aiokafka_security_options(settings)
    credentials = faust_credentials(settings)
    assert isinstance(credentials, SASLCredentials)
    assert credentials.protocol.value == "SASL_PLAINTEXT"


def test_the_password_is_masked_in_logs_and_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in SASL.items():
        monkeypatch.setenv(key.upper(), value)
    settings = load_worker_settings()
    assert settings.kafka_sasl_password is not None
    assert settings.kafka_sasl_password.get_secret_value() == PASSWORD
    assert PASSWORD not in repr(settings)
    masker = SecretMasker(secrets_of(settings))
    assert masker(f"connecting with {PASSWORD}") == "connecting with ********"


def test_empty_values_from_compose_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD", "KAFKA_SSL_CA_LOCATION"):
        monkeypatch.setenv(name, "")
    settings = load_kafka_client_settings()
    assert settings.kafka_sasl_username is None and settings.kafka_ssl_ca_location is None
