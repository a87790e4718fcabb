"""One connection to Kafka before any client starts: refused credentials or an untrusted
certificate stop start-up with one line that says what to fix.

aiokafka's clients log every failed connection and retry, so a wrong password looks like a
worker waiting for a broker. This check connects to the bootstrap servers as the clients will
(TLS handshake, SASL authentication, one Metadata round trip, as a client bootstraps) and
translates what went wrong. A server that cannot be reached at all is passed over for the
next one; only when none answers does start-up stop, with ``StackError``.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

from aiokafka.conn import create_conn
from aiokafka.errors import (
    IllegalSaslStateError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.protocol.metadata import MetadataRequest

from processor.errors import ConfigurationError, StackError
from processor.kafka_security import TLS_PROTOCOLS, aiokafka_security_options
from processor.settings import KafkaClientSettings

CHECK_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class _Unreachable:
    address: str
    reason: str


async def check_kafka_access(
    settings: KafkaClientSettings, *, timeout_s: float = CHECK_TIMEOUT_S
) -> None:
    """Return once one bootstrap server accepted the connection as configured.

    Raises ``ConfigurationError`` when a server refused it for a reason of the settings
    (credentials, certificates, protocol), ``StackError`` when no server could be reached.
    """
    unreachable: list[_Unreachable] = []
    for server in settings.kafka_bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        address = f"{host}:{port}"
        problem = await _try_server(settings, host.strip("[]"), int(port), timeout_s)
        if problem is None:
            return
        unreachable.append(_Unreachable(address, problem))
    reasons = "; ".join(f"{entry.address}: {entry.reason}" for entry in unreachable)
    raise StackError(
        f"cannot reach Kafka at {settings.kafka_bootstrap_servers} ({reasons}); start it "
        "(`trace-processor stack up`) or set KAFKA_BOOTSTRAP_SERVERS"
    )


async def _try_server(
    settings: KafkaClientSettings, host: str, port: int, timeout_s: float
) -> str | None:
    """None when the server accepted us; why not when it could not be reached."""
    address = f"{host}:{port}"
    protocol = settings.kafka_security_protocol
    try:
        # TCP alone first: a server that cannot be reached is not a sign of wrong settings.
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            await writer.wait_closed()
    except OSError as exc:  # refused, unreachable, or TimeoutError
        return _brief(exc)
    try:
        async with asyncio.timeout(timeout_s):
            conn = await create_conn(
                host,
                port,
                client_id="trace-processor-access-check",
                request_timeout_ms=int(timeout_s * 1000),
                **aiokafka_security_options(settings),
            )
            try:
                await conn.send(MetadataRequest([]))
            finally:
                conn.close()
    except ssl.SSLCertVerificationError as exc:
        raise ConfigurationError(_untrusted(settings, address, exc)) from None
    except ssl.SSLError as exc:
        raise ConfigurationError(_tls_refused(address, exc)) from None
    except (SaslAuthenticationFailed, IllegalSaslStateError) as exc:
        raise ConfigurationError(
            f"Kafka at {address} refused the credentials of KAFKA_SASL_USERNAME="
            f"{settings.kafka_sasl_username} ({settings.kafka_sasl_mechanism}): check "
            f"KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD ({_brief(exc)})"
        ) from None
    except UnsupportedSaslMechanismError as exc:
        raise ConfigurationError(
            f"Kafka at {address} does not offer KAFKA_SASL_MECHANISM="
            f"{settings.kafka_sasl_mechanism} ({_brief(exc)})"
        ) from None
    except (TimeoutError, OSError, KafkaError) as exc:
        # Connected, then no answer or a closed connection: the usual sign of a client and a
        # listener that disagree on TLS or SASL, or of a listener wanting a client certificate
        # (aiokafka reports the TLS alert saying so as a closed connection).
        if protocol in TLS_PROTOCOLS and settings.kafka_ssl_certificate_location is None:
            raise ConfigurationError(
                f"Kafka at {address} closed the TLS connection ({_brief(exc)}): it may require "
                "a client certificate (set KAFKA_SSL_CERTIFICATE_LOCATION and "
                "KAFKA_SSL_KEY_LOCATION), or KAFKA_SECURITY_PROTOCOL does not match its "
                "listener on this port"
            ) from None
        raise ConfigurationError(
            f"Kafka at {address} accepted the connection but did not answer {protocol} "
            f"({_brief(exc)}): check that KAFKA_SECURITY_PROTOCOL matches the broker's listener "
            "on this port"
        ) from None
    return None


def _untrusted(
    settings: KafkaClientSettings, address: str, exc: ssl.SSLCertVerificationError
) -> str:
    message = exc.verify_message or _brief(exc)
    if "mismatch" in message or "match" in message:
        return (
            f"the certificate of Kafka at {address} is not for that host ({message}): connect "
            "by a name the certificate holds, or set "
            "KAFKA_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM=none"
        )
    trusted = (
        f"KAFKA_SSL_CA_LOCATION={settings.kafka_ssl_ca_location}"
        if settings.kafka_ssl_ca_location
        else "the system's CAs (KAFKA_SSL_CA_LOCATION is unset)"
    )
    return (
        f"the certificate of Kafka at {address} is not trusted by {trusted} ({message}): set "
        "KAFKA_SSL_CA_LOCATION to the CA that signed the brokers' certificates"
    )


def _tls_refused(address: str, exc: ssl.SSLError) -> str:
    reason = str(exc.reason or exc)
    if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason:
        return (
            f"Kafka at {address} does not speak TLS on this port ({reason}): check "
            "KAFKA_SECURITY_PROTOCOL and the port"
        )
    if "CERTIFICATE_REQUIRED" in reason or "BAD_CERTIFICATE" in reason:
        return (
            f"Kafka at {address} requires a client certificate it trusts ({reason}): set "
            "KAFKA_SSL_CERTIFICATE_LOCATION and KAFKA_SSL_KEY_LOCATION"
        )
    return f"the TLS handshake with Kafka at {address} failed ({reason})"


def _brief(exc: BaseException) -> str:
    name, text = type(exc).__name__, str(exc)
    if not text:
        return name
    return text if text.startswith(name) else f"{name}: {text}"
