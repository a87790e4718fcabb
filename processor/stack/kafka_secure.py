"""The secured local Kafka node: its listeners, its SASL user, and its clients' settings.

A secured node (``STACK_KAFKA_SECURE``) has no plaintext client listener: clients reach it
with SASL_SSL on its client port (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512, one user), or with
mutual TLS on its mTLS port (a certificate of the stack's CA); the controller listener stays
plaintext on loopback. Its certificates are kafka_tls.py's.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from processor.stack.kafka_nodes import KafkaNode
from processor.stack.layout import KafkaTlsFiles
from processor.stack.ports import LOOPBACK

SASL_USERNAME = "trace_processor"
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")
# The stack's own clients of a secured node (its health check) use the strongest mechanism.
STACK_CLIENT_MECHANISM = "SCRAM-SHA-512"
SASL_LISTENER = "SASL_SSL"
MTLS_LISTENER = "MTLS"
# Every security setting of KafkaClientSettings that may be empty: a client environment sets
# all of them, so that sourcing one env file clears what another left in the shell.
CLIENT_SECURITY_VARIABLES = (
    "KAFKA_SECURITY_PROTOCOL",
    "KAFKA_SASL_MECHANISM",
    "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_PASSWORD",
    "KAFKA_SSL_CA_LOCATION",
    "KAFKA_SSL_CERTIFICATE_LOCATION",
    "KAFKA_SSL_KEY_LOCATION",
    "KAFKA_SSL_KEY_PASSWORD",
)
_MASK = "***"


@dataclass(frozen=True, kw_only=True)
class BrokerSecurity:
    """What a secured node's listeners need: its keystore, the CA that client certificates must
    chain to (PEM), and its one SASL user."""

    keystore: Path
    keystore_password: SecretStr
    truststore: Path
    sasl_username: str
    sasl_password: SecretStr


def secured_listeners(node: KafkaNode, security: BrokerSecurity) -> dict[str, str]:
    if node.mtls_port is None:
        raise ValueError(f"{node.process_name} has no mTLS port; only a secured node has")
    sasl = f"{SASL_LISTENER}://{LOOPBACK}:{node.port}"
    mtls = f"{MTLS_LISTENER}://{LOOPBACK}:{node.mtls_port}"
    sasl_prefix = f"listener.name.{SASL_LISTENER.lower()}"
    scram_login = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    plain_login = (
        "org.apache.kafka.common.security.plain.PlainLoginModule required "
        f'user_{security.sasl_username}="{security.sasl_password.get_secret_value()}";'
    )
    return {
        "listeners": f"{sasl},{mtls},CONTROLLER://{LOOPBACK}:{node.controller_port}",
        "advertised.listeners": f"{sasl},{mtls}",
        "listener.security.protocol.map": (
            f"{SASL_LISTENER}:SASL_SSL,{MTLS_LISTENER}:SSL,CONTROLLER:PLAINTEXT"
        ),
        "controller.listener.names": "CONTROLLER",
        # Brokers talk to each other over mutual TLS: the broker's certificate is also a
        # client certificate, so they need no SASL credentials of their own.
        "inter.broker.listener.name": MTLS_LISTENER,
        "sasl.enabled.mechanisms": ",".join(SASL_MECHANISMS),
        # PLAIN checks passwords against its JAAS options; SCRAM against the credentials the
        # storage was formatted with, so its login module needs none.
        f"{sasl_prefix}.plain.sasl.jaas.config": plain_login,
        **{
            f"{sasl_prefix}.{mechanism.lower()}.sasl.jaas.config": scram_login
            for mechanism in _SCRAM_MECHANISMS
        },
        "ssl.keystore.type": "PKCS12",
        "ssl.keystore.location": str(security.keystore),
        "ssl.keystore.password": security.keystore_password.get_secret_value(),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(security.truststore),
        "ssl.client.auth": "none",
        f"listener.name.{MTLS_LISTENER.lower()}.ssl.client.auth": "required",
    }


def scram_format_options(username: str, password: SecretStr) -> list[str]:
    """The storage tool's options that create ``username`` for every SCRAM mechanism."""
    secret = password.get_secret_value()
    options: list[str] = []
    for mechanism in _SCRAM_MECHANISMS:
        options += ["--add-scram", f"{mechanism}=[name={username},password={secret}]"]
    return options


def loggable_command(command: Sequence[str], hidden: Iterable[SecretStr]) -> str:
    """``command`` as one line for a log, each of the ``hidden`` values masked."""
    line = " ".join(command)
    for secret in hidden:
        if value := secret.get_secret_value():
            line = line.replace(value, _MASK)
    return line


def secured_client_env(
    node: KafkaNode, tls: KafkaTlsFiles, sasl_password: SecretStr | None, *, mutual_tls: bool
) -> dict[str, str]:
    """The KAFKA_* settings (as KafkaClientSettings reads them) of a client of a secured node:
    SASL_SSL with SCRAM-SHA-512 as the stack's user, or with ``mutual_tls`` the client
    certificate on the mTLS port. Settings the variant does not use are empty."""
    env = {"KAFKA_BOOTSTRAP_SERVERS": node.address, **dict.fromkeys(CLIENT_SECURITY_VARIABLES, "")}
    env["KAFKA_SSL_CA_LOCATION"] = str(tls.ca)
    if mutual_tls:
        env["KAFKA_BOOTSTRAP_SERVERS"] = f"{LOOPBACK}:{node.mtls_port}"
        env["KAFKA_SECURITY_PROTOCOL"] = "SSL"
        env["KAFKA_SSL_CERTIFICATE_LOCATION"] = str(tls.client_certificate)
        env["KAFKA_SSL_KEY_LOCATION"] = str(tls.client_key)
        return env
    if sasl_password is None:
        raise ValueError("a SASL_SSL client needs the SASL password")
    env["KAFKA_SECURITY_PROTOCOL"] = "SASL_SSL"
    env["KAFKA_SASL_MECHANISM"] = STACK_CLIENT_MECHANISM
    env["KAFKA_SASL_USERNAME"] = SASL_USERNAME
    env["KAFKA_SASL_PASSWORD"] = sasl_password.get_secret_value()
    return env


def env_file_text(env: Mapping[str, str], *, path: Path) -> str:
    """``env`` as a file both a POSIX shell and a ``.env`` reader take, saying how to use it."""
    header = (
        "# Client settings of the local stack's secured Kafka; to set them in a shell:\n"
        f"#   set -a; . {shlex.quote(str(path))}; set +a\n"
    )
    return header + "".join(f"{name}={shlex.quote(value)}\n" for name, value in env.items())
