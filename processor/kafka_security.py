"""How every Kafka client of the product authenticates and encrypts: SASL and TLS options.

The settings (``KAFKA_SECURITY_PROTOCOL``, ``KAFKA_SASL_*``, ``KAFKA_SSL_*``, named as Kafka
clients name them) are validated in ``processor.settings``; this module turns them into what
the clients take: keyword arguments for any aiokafka client, and faust's broker credentials,
so that the worker's consumers and producers, its admin clients, ``topics create``,
``loadgen`` and the agents' exporter all connect the same way.

The TLS context is made once per settings object: reading the files again per client would let
a certificate replaced on disk give two clients of one process different identities.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from faust.types.auth import CredentialsT

    from processor.settings import KafkaClientSettings

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
TLS_PROTOCOLS = frozenset({"SSL", "SASL_SSL"})
SASL_PROTOCOLS = frozenset({"SASL_PLAINTEXT", "SASL_SSL"})


def build_ssl_context(
    *,
    ca_location: Path | None,
    certificate_location: Path | None,
    key_location: Path | None,
    key_password: str | None,
    check_hostname: bool,
) -> ssl.SSLContext:
    """A client TLS context; ``ValueError`` naming the setting to fix when a file is unusable.

    Without a CA file the system's trusted CAs apply (what managed Kafka services need).
    """
    if ca_location is not None:
        _must_exist("KAFKA_SSL_CA_LOCATION", ca_location)
    try:
        # With a CA file, that CA alone is trusted, as in Kafka's own clients.
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(ca_location) if ca_location else None
        )
    except ssl.SSLError as exc:
        raise ValueError(
            f"KAFKA_SSL_CA_LOCATION={ca_location} holds no PEM CA certificate "
            f"({exc.reason or exc}); point it at the CA that signed the brokers' certificates"
        ) from None
    context.check_hostname = check_hostname
    if certificate_location is not None:
        _must_exist("KAFKA_SSL_CERTIFICATE_LOCATION", certificate_location)
        if key_location is not None:
            _must_exist("KAFKA_SSL_KEY_LOCATION", key_location)
        try:
            context.load_cert_chain(
                str(certificate_location),
                str(key_location) if key_location is not None else None,
                # A callable, so that OpenSSL never prompts on the terminal for a missing one.
                password=lambda: key_password or "",
            )
        except ssl.SSLError as exc:
            raise ValueError(_cert_chain_problem(exc, certificate_location, key_location)) from None
    return context


def _must_exist(name: str, path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"{name}={path}: no such file")


def _cert_chain_problem(exc: ssl.SSLError, certificate: Path, key: Path | None) -> str:
    reason = str(exc.reason or exc)
    if "KEY_VALUES_MISMATCH" in reason:
        return (
            f"KAFKA_SSL_KEY_LOCATION={key} is not the key of the certificate in "
            f"KAFKA_SSL_CERTIFICATE_LOCATION={certificate}"
        )
    if "BAD_DECRYPT" in reason or "BAD_PASSWORD" in reason or _is_encrypted(key or certificate):
        # OpenSSL often says no more than "PEM lib" for a wrong or a missing password.
        return (
            f"KAFKA_SSL_KEY_PASSWORD does not decrypt the key in {key or certificate} (the key "
            "is encrypted: set its password)"
        )
    if key is None:
        return (
            f"KAFKA_SSL_CERTIFICATE_LOCATION={certificate} holds no usable certificate and "
            f"private key ({reason}); set KAFKA_SSL_KEY_LOCATION to the key's PEM file"
        )
    return (
        f"KAFKA_SSL_CERTIFICATE_LOCATION={certificate} / KAFKA_SSL_KEY_LOCATION={key}: not a "
        f"PEM certificate and its private key ({reason})"
    )


def _is_encrypted(key: Path) -> bool:
    try:
        return b"ENCRYPTED" in key.read_bytes()
    except OSError:
        return False


def aiokafka_security_options(settings: KafkaClientSettings) -> dict[str, Any]:
    """The keyword arguments that make any aiokafka client connect as the settings say."""
    protocol = settings.kafka_security_protocol
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol in TLS_PROTOCOLS:
        options["ssl_context"] = settings.kafka_ssl_context
    if protocol in SASL_PROTOCOLS:
        assert settings.kafka_sasl_password is not None  # the settings validate it
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return options


def faust_credentials(settings: KafkaClientSettings) -> CredentialsT | None:
    """faust's ``broker_credentials``: faust hands them to each of its aiokafka clients."""
    # Imported here: agents publishing spans use this module and need no faust.
    from faust.auth import SASLCredentials, SSLCredentials

    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    if protocol == "SSL":
        return SSLCredentials(settings.kafka_ssl_context)
    assert settings.kafka_sasl_password is not None  # the settings validate it
    return SASLCredentials(
        username=settings.kafka_sasl_username,
        password=settings.kafka_sasl_password.get_secret_value(),
        mechanism=settings.kafka_sasl_mechanism,
        ssl_context=settings.kafka_ssl_context if protocol == "SASL_SSL" else None,
    )
