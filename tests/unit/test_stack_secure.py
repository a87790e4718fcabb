"""The secured local Kafka's pure parts: its configuration, certificates and client settings.

No broker runs here (tests/integration/test_secure_stack.py starts one); the certificates are
checked with the ``cryptography`` API and in real TLS handshakes over a socket pair.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    pkcs12,
)
from cryptography.x509.oid import ExtendedKeyUsageOID
from pydantic import SecretStr

from processor.errors import ConfigurationError, StackError
from processor.settings import KafkaClientSettings, StackSettings, load_stack_settings
from processor.stack import LocalStack
from processor.stack.cli import secured_kafka_summary
from processor.stack.kafka import java_argument_file, server_properties
from processor.stack.kafka_nodes import kafka_nodes, node_id_of, node_of_process
from processor.stack.kafka_secure import (
    BrokerSecurity,
    env_file_text,
    loggable_command,
    scram_format_options,
    secured_client_env,
)
from processor.stack.kafka_tls import BROKER_KEY_ALIAS, ensure_tls_files
from processor.stack.layout import KafkaTlsFiles, StackLayout
from processor.stack.process import group_is_alive
from processor.stack.service import LaunchSpec
from processor.stack.service_process import ServiceProcess

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
PASSWORD = SecretStr("0123456789abcdef-sasl")
SECURE = {"kafka_port": 28092, "kafka_controller_port": 28093, "kafka_mtls_port": 28099}


def _properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and line[0] != "#")


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> KafkaTlsFiles:
    files = KafkaTlsFiles(tmp_path_factory.mktemp("state") / "kafka-tls")
    assert ensure_tls_files(files, now=NOW)
    return files


def _certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _keystore(tls: KafkaTlsFiles) -> pkcs12.PKCS12KeyAndCertificates:
    password = tls.keystore_password().get_secret_value().encode()
    return pkcs12.load_pkcs12(tls.broker_keystore.read_bytes(), password)


def _security(tls: KafkaTlsFiles) -> BrokerSecurity:
    return BrokerSecurity(
        keystore=tls.broker_keystore,
        keystore_password=tls.keystore_password(),
        truststore=tls.ca,
        sasl_username="trace_processor",
        sasl_password=PASSWORD,
    )


# --- settings and nodes ---------------------------------------------------------------------


def test_the_secured_kafka_is_one_node_with_data_of_its_own() -> None:
    (node,) = kafka_nodes(StackSettings(kafka_secure=True, **SECURE))

    assert (node.node_id, node.port, node.controller_port, node.mtls_port) == (
        1,
        28092,
        28093,
        28099,
    )
    # Not `kafka`: its storage holds SCRAM users, so plaintext and secured keep their own.
    assert node.process_name == "kafka-secure" and node.secure
    assert node_id_of("kafka-secure") == 1
    assert node_of_process("kafka-secure", (28092, 28093, 28099)) == node
    assert node_of_process("kafka-secure", (28092, 28093)) is None
    assert (
        node_of_process("kafka-2", (28094, 28095))
        == kafka_nodes(
            StackSettings(kafka_brokers=2, kafka_port=28092, kafka_controller_port=28093)
        )[1]
    )


def test_the_secured_kafka_refuses_a_cluster_naming_both_settings() -> None:
    with pytest.raises(ConfigurationError, match=r"STACK_KAFKA_SECURE runs one Kafka node.*3"):
        load_stack_settings(kafka_secure=True, kafka_brokers=3)


def test_the_mtls_port_is_checked_against_the_others(tmp_path: Path) -> None:
    settings = StackSettings(dir=tmp_path, kafka_secure=True, **{**SECURE, "kafka_mtls_port": 5000})

    with pytest.raises(StackError, match="STACK_KAFKA_MTLS_PORT and STACK_MLFLOW_PORT"):
        LocalStack(settings)


# --- server.properties ----------------------------------------------------------------------


def test_a_secured_node_listens_for_sasl_ssl_and_mutual_tls_only(
    tls: KafkaTlsFiles, tmp_path: Path
) -> None:
    nodes = kafka_nodes(StackSettings(kafka_secure=True, **SECURE))
    props = _properties(server_properties(nodes[0], nodes, tmp_path, _security(tls)))

    assert props["listeners"] == (
        "SASL_SSL://127.0.0.1:28092,MTLS://127.0.0.1:28099,CONTROLLER://127.0.0.1:28093"
    )
    assert props["advertised.listeners"] == "SASL_SSL://127.0.0.1:28092,MTLS://127.0.0.1:28099"
    assert props["listener.security.protocol.map"] == (
        "SASL_SSL:SASL_SSL,MTLS:SSL,CONTROLLER:PLAINTEXT"
    )
    assert "PLAINTEXT://" not in props["listeners"]
    assert props["controller.listener.names"] == "CONTROLLER"
    assert props["inter.broker.listener.name"] == "MTLS"
    assert props["sasl.enabled.mechanisms"] == "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512"
    assert props["ssl.client.auth"] == "none"
    assert props["listener.name.mtls.ssl.client.auth"] == "required"
    assert props["ssl.keystore.type"] == "PKCS12"
    assert props["ssl.keystore.location"] == str(tls.broker_keystore)
    assert props["ssl.keystore.password"] == tls.keystore_password().get_secret_value()
    assert (props["ssl.truststore.type"], props["ssl.truststore.location"]) == ("PEM", str(tls.ca))


def test_a_secured_node_knows_the_one_user_for_every_mechanism(
    tls: KafkaTlsFiles, tmp_path: Path
) -> None:
    nodes = kafka_nodes(StackSettings(kafka_secure=True, **SECURE))
    props = _properties(server_properties(nodes[0], nodes, tmp_path, _security(tls)))

    plain = props["listener.name.sasl_ssl.plain.sasl.jaas.config"]
    assert plain == (
        "org.apache.kafka.common.security.plain.PlainLoginModule required "
        f'user_trace_processor="{PASSWORD.get_secret_value()}";'
    )
    for mechanism in ("scram-sha-256", "scram-sha-512"):
        assert props[f"listener.name.sasl_ssl.{mechanism}.sasl.jaas.config"] == (
            "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        )


def test_a_plaintext_node_has_no_security_settings(tmp_path: Path) -> None:
    nodes = kafka_nodes(StackSettings(kafka_port=28092, kafka_controller_port=28093))
    props = _properties(server_properties(nodes[0], nodes, tmp_path))

    assert not [key for key in props if "ssl" in key or "sasl" in key]
    assert props["inter.broker.listener.name"] == "PLAINTEXT"


# --- the storage format command --------------------------------------------------------------


def test_the_scram_user_is_formatted_for_both_mechanisms() -> None:
    assert scram_format_options("trace_processor", PASSWORD) == [
        "--add-scram",
        f"SCRAM-SHA-256=[name=trace_processor,password={PASSWORD.get_secret_value()}]",
        "--add-scram",
        f"SCRAM-SHA-512=[name=trace_processor,password={PASSWORD.get_secret_value()}]",
    ]


def test_the_logged_format_command_masks_the_password() -> None:
    command = ["java", "kafka.tools.StorageTool", "format", "-t", "abc"]
    command += scram_format_options("trace_processor", PASSWORD)

    line = loggable_command(command, [PASSWORD])

    assert PASSWORD.get_secret_value() not in line
    assert "SCRAM-SHA-512=[name=trace_processor,password=***]" in line
    assert line.startswith("java kafka.tools.StorageTool format -t abc --add-scram ")
    assert loggable_command(["java", "-version"], []) == "java -version"


def test_the_java_argument_file_quotes_every_argument() -> None:
    text = java_argument_file(["-cp", "/a b/x.jar", 'say "hi"', "C:\\dir", "#not-a-comment"])

    assert text.splitlines() == [
        '"-cp"',
        '"/a b/x.jar"',
        '"say \\"hi\\""',
        '"C:\\\\dir"',
        '"#not-a-comment"',
    ]


@pytest.mark.skipif(shutil.which("java") is None, reason="needs a java launcher")
def test_java_reads_the_argument_file_as_the_command_line(tmp_path: Path) -> None:
    # A class-less check of the launcher's parsing: -XshowSettings echoes a -D property.
    argument_file = tmp_path / "args"
    argument_file.write_text(
        java_argument_file(['-Dcheck.value=a b "c" d\'e', "-XshowSettings:properties", "-version"])
    )
    java = shutil.which("java")
    assert java is not None

    result = subprocess.run(
        [java, f"@{argument_file}"], capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode == 0, result.stderr
    assert 'check.value = a b "c" d\'e' in result.stderr


# --- certificates ----------------------------------------------------------------------------


def test_the_broker_certificate_names_loopback_by_ip_and_name(tls: KafkaTlsFiles) -> None:
    broker = _keystore(tls).cert
    assert broker is not None
    names = broker.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)

    assert names.value.get_values_for_type(x509.IPAddress) == [ip_address("127.0.0.1")]
    assert names.value.get_values_for_type(x509.DNSName) == ["localhost"]
    usages = broker.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    # It is its own client certificate when brokers talk to each other.
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert broker.friendly_name == BROKER_KEY_ALIAS.encode()


def test_the_broker_and_client_certificates_chain_to_the_ca_only(tls: KafkaTlsFiles) -> None:
    ca = _certificate(tls.ca)
    other_ca = _certificate(tls.other_ca)
    keystore = _keystore(tls)
    assert keystore.cert is not None
    client = _certificate(tls.client_certificate)

    for leaf in (keystore.cert.certificate, client):
        leaf.verify_directly_issued_by(ca)
        with pytest.raises((InvalidSignature, ValueError)):
            leaf.verify_directly_issued_by(other_ca)
    # The keystore carries the chain, so the broker sends the CA along.
    assert [entry.certificate for entry in keystore.additional_certs] == [ca]
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    assert client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == (
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    )


def test_certificates_are_valid_from_before_now_for_years(tls: KafkaTlsFiles) -> None:
    for path in (tls.ca, tls.client_certificate, tls.other_ca):
        certificate = _certificate(path)
        assert certificate.not_valid_before_utc < NOW
        assert certificate.not_valid_after_utc > NOW + timedelta(days=5 * 365)


def test_keys_and_passwords_are_readable_by_their_owner_only(tls: KafkaTlsFiles) -> None:
    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(tls.folder) == 0o700
    for secret in (tls.broker_keystore, tls.keystore_password_path, tls.client_key):
        assert mode(secret) == 0o600, secret
    assert not [path for path in tls.folder.iterdir() if path.name.endswith(".tmp")]


def test_the_files_are_made_once_and_again_as_a_set_when_one_is_missing(tmp_path: Path) -> None:
    files = KafkaTlsFiles(tmp_path / "kafka-tls")
    assert ensure_tls_files(files, now=NOW)
    first_ca = files.ca.read_bytes()

    assert not ensure_tls_files(files, now=NOW)
    assert files.ca.read_bytes() == first_ca

    files.client_key.unlink()
    assert ensure_tls_files(files, now=NOW)
    # A new CA with the new client key: never a key of one run beside a CA of another.
    assert files.ca.read_bytes() != first_ca
    client = _certificate(files.client_certificate)
    client.verify_directly_issued_by(_certificate(files.ca))


@pytest.mark.skipif(shutil.which("keytool") is None, reason="needs Java's keytool")
def test_java_reads_the_broker_keystore(tls: KafkaTlsFiles) -> None:
    keytool = shutil.which("keytool")
    assert keytool is not None
    result = subprocess.run(
        [
            keytool, "-list", "-v", "-storetype", "PKCS12", "-keystore", str(tls.broker_keystore),
            "-storepass:file", str(tls.keystore_password_path),
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Alias name: {BROKER_KEY_ALIAS}" in result.stdout
    assert "PrivateKeyEntry" in result.stdout
    assert "Certificate chain length: 2" in result.stdout


# --- TLS handshakes over a socket pair -------------------------------------------------------


def _broker_context(tls: KafkaTlsFiles, tmp_path: Path, *, require_client: bool) -> ssl.SSLContext:
    """A server context with the broker's key, as the keystore holds it."""
    keystore = _keystore(tls)
    assert keystore.key is not None and keystore.cert is not None
    pem = tmp_path / "broker.pem"
    pem.write_bytes(
        keystore.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        + keystore.cert.certificate.public_bytes(Encoding.PEM)
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pem)
    if require_client:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(tls.ca)
    return context


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, server_hostname: str) -> None:
    """Both sides of a handshake and one byte each way; raises the client's error."""
    client_socket, server_socket = socket.socketpair()
    server_error: list[BaseException] = []

    def serve() -> None:
        try:
            with server.wrap_socket(server_socket, server_side=True) as tls_socket:
                tls_socket.sendall(tls_socket.recv(1))
        except (ssl.SSLError, OSError) as exc:
            server_error.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        client_socket.settimeout(10)
        with client.wrap_socket(client_socket, server_hostname=server_hostname) as tls_socket:
            tls_socket.sendall(b"x")
            # With TLS 1.3 a refused client certificate shows on the first read.
            assert tls_socket.recv(1) == b"x"
    finally:
        client_socket.close()
        server_socket.close()
        thread.join(10)


def _client_settings(tls: KafkaTlsFiles, **changes: str) -> KafkaClientSettings:
    (node,) = kafka_nodes(StackSettings(kafka_secure=True, **SECURE))
    env = secured_client_env(node, tls, PASSWORD, mutual_tls=True)
    return KafkaClientSettings.model_validate({**env, **changes})


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_client_trusting_the_ca_accepts_the_broker_by_address_and_name(
    tls: KafkaTlsFiles, tmp_path: Path, host: str
) -> None:
    client = _client_settings(tls).kafka_ssl_context
    assert client.check_hostname

    _handshake(_broker_context(tls, tmp_path, require_client=False), client, host)


def test_a_client_trusting_another_ca_refuses_the_broker(
    tls: KafkaTlsFiles, tmp_path: Path
) -> None:
    client = _client_settings(tls, KAFKA_SSL_CA_LOCATION=str(tls.other_ca)).kafka_ssl_context

    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        _handshake(_broker_context(tls, tmp_path, require_client=False), client, "127.0.0.1")


def test_the_broker_certificate_does_not_name_other_hosts(
    tls: KafkaTlsFiles, tmp_path: Path
) -> None:
    client = _client_settings(tls).kafka_ssl_context

    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(_broker_context(tls, tmp_path, require_client=False), client, "127.0.0.2")


def test_the_client_certificate_passes_a_server_that_requires_one(
    tls: KafkaTlsFiles, tmp_path: Path
) -> None:
    server = _broker_context(tls, tmp_path, require_client=True)
    _handshake(server, _client_settings(tls).kafka_ssl_context, "127.0.0.1")

    without = _client_settings(
        tls, KAFKA_SSL_CERTIFICATE_LOCATION="", KAFKA_SSL_KEY_LOCATION=""
    ).kafka_ssl_context
    with pytest.raises((ssl.SSLError, OSError)):
        _handshake(server, without, "127.0.0.1")


# --- client settings -------------------------------------------------------------------------


def test_the_sasl_client_settings_validate_and_name_scram_sha_512(tls: KafkaTlsFiles) -> None:
    (node,) = kafka_nodes(StackSettings(kafka_secure=True, **SECURE))
    env = secured_client_env(node, tls, PASSWORD, mutual_tls=False)

    settings = KafkaClientSettings.model_validate(env)

    assert settings.kafka_bootstrap_servers == "127.0.0.1:28092"
    assert settings.kafka_security_protocol == "SASL_SSL"
    assert settings.kafka_sasl_mechanism == "SCRAM-SHA-512"
    assert settings.kafka_sasl_username == "trace_processor"
    assert settings.kafka_sasl_password == PASSWORD
    assert settings.kafka_ssl_ca_location == tls.ca
    assert settings.kafka_ssl_certificate_location is None


def test_the_mtls_client_settings_point_at_the_mtls_port_with_the_certificate(
    tls: KafkaTlsFiles,
) -> None:
    settings = _client_settings(tls)

    assert settings.kafka_bootstrap_servers == "127.0.0.1:28099"
    assert settings.kafka_security_protocol == "SSL"
    assert settings.kafka_sasl_password is None
    assert settings.kafka_ssl_certificate_location == tls.client_certificate
    assert settings.kafka_ssl_key_location == tls.client_key


def test_the_env_file_sets_every_value_in_a_shell(tls: KafkaTlsFiles, tmp_path: Path) -> None:
    env = {"KAFKA_SSL_CA_LOCATION": str(tmp_path / "a dir" / "ca.pem"), "KAFKA_SASL_MECHANISM": ""}
    env["KAFKA_SASL_PASSWORD"] = "p'w$x"
    path = tmp_path / "client.env"
    path.write_text(env_file_text(env, path=path))

    shown = subprocess.run(
        ["sh", "-c", f'set -a; . "{path}"; set +a; env -0'],
        capture_output=True, check=True, env={"PATH": os.environ["PATH"]},
    ).stdout.decode()  # fmt: skip

    variables = dict(entry.split("=", 1) for entry in shown.split("\0") if "=" in entry)
    assert {name: variables.get(name) for name in env} == env


# --- the stack -------------------------------------------------------------------------------


def _secured_stack(tmp_path: Path) -> LocalStack:
    """A secured stack whose node has been prepared once: its certificates and password made,
    as the first `up --secure` leaves them (no broker started)."""
    stack = LocalStack(StackSettings(dir=tmp_path, kafka_secure=True, **SECURE))
    ensure_tls_files(stack.layout.kafka_tls, now=NOW)
    home = stack.layout.data_dir("kafka-secure")
    home.mkdir(parents=True)
    (home / "sasl-password").write_text(f"{PASSWORD.get_secret_value()}\n")
    return stack


def test_the_stack_hands_out_the_settings_of_its_secured_kafka(tmp_path: Path) -> None:
    stack = _secured_stack(tmp_path)

    sasl = stack.kafka_client_settings()
    mtls = stack.kafka_client_settings(mutual_tls=True)

    assert sasl.kafka_sasl_password == PASSWORD
    assert sasl.kafka_ssl_ca_location == stack.layout.kafka_tls.ca
    assert mtls.kafka_bootstrap_servers == "127.0.0.1:28099"
    assert stack.kafka_client_env_path() == tmp_path.resolve() / "client.env"


def test_a_secured_kafka_never_started_says_so(tmp_path: Path) -> None:
    stack = LocalStack(StackSettings(dir=tmp_path, kafka_secure=True, **SECURE))

    with pytest.raises(StackError, match="has not been started yet; run `trace-processor stack"):
        stack.kafka_client_env()


def test_a_plaintext_stack_hands_out_plaintext_settings(tmp_path: Path) -> None:
    stack = LocalStack(StackSettings(dir=tmp_path, kafka_port=28092, kafka_controller_port=28093))

    settings = stack.kafka_client_settings()

    assert settings.kafka_bootstrap_servers == "127.0.0.1:28092"
    assert settings.kafka_security_protocol == "PLAINTEXT"
    with pytest.raises(StackError, match="mutual TLS needs the secured Kafka"):
        stack.kafka_client_env(mutual_tls=True)


def test_stack_up_prints_every_setting_but_the_password(tmp_path: Path) -> None:
    stack = _secured_stack(tmp_path)

    summary = secured_kafka_summary(stack)

    assert PASSWORD.get_secret_value() not in summary
    env_file = tmp_path.resolve() / "client.env"
    assert f"KAFKA_SASL_PASSWORD: in {env_file}" in summary
    assert f"set -a; . {env_file}; set +a" in summary
    assert f"set -a; . {tmp_path.resolve() / 'client-mtls.env'}; set +a" in summary
    for line in (
        "KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:28092",
        "KAFKA_SECURITY_PROTOCOL=SASL_SSL",
        "KAFKA_SASL_MECHANISM=SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME=trace_processor",
        f"KAFKA_SSL_CA_LOCATION={stack.layout.kafka_tls.ca}",
    ):
        assert line in summary.splitlines()


@pytest.fixture
def stand_in() -> Iterator[list[ServiceProcess]]:
    """Processes spawned as if they were Kafka nodes of the state folder; stopped afterwards."""
    processes: list[ServiceProcess] = []
    yield processes
    for process in processes:
        process.stop(grace_s=5)


def _spawn_node(name: str, tmp_path: Path, ports: list[int], stand_in: list[ServiceProcess]) -> int:
    process = ServiceProcess(name, StackLayout.at(tmp_path))
    stand_in.append(process)
    sleeper = LaunchSpec(
        command=[sys.executable, "-c", "import time; time.sleep(60)"], cwd=tmp_path
    )
    pid = process.spawn(sleeper, ports=ports)
    time.sleep(0.1)
    return pid


def test_a_plaintext_up_beside_a_secured_node_says_to_use_secure(
    tmp_path: Path, stand_in: list[ServiceProcess]
) -> None:
    pid = _spawn_node("kafka-secure", tmp_path, [28092, 28093, 28099], stand_in)
    stack = LocalStack(StackSettings(dir=tmp_path, kafka_port=28092, kafka_controller_port=28093))

    status = stack.status()["kafka-secure"]
    assert status.running and status.pid == pid and status.url == "127.0.0.1:28092"
    assert not status.healthy
    with pytest.raises(StackError, match=r"running as kafka-secure .* use --secure"):
        stack.up(["kafka"])

    stack.down(["kafka"])  # every Kafka node of the folder, the secured one too
    assert not group_is_alive(pid)


def test_a_secured_up_beside_a_plaintext_node_says_to_use_plaintext(
    tmp_path: Path, stand_in: list[ServiceProcess]
) -> None:
    _spawn_node("kafka", tmp_path, [28092, 28093], stand_in)
    stack = LocalStack(StackSettings(dir=tmp_path, kafka_secure=True, **SECURE))

    with pytest.raises(
        StackError,
        match=r"not as the secured node .* use --plaintext \(STACK_KAFKA_SECURE=false\), or run",
    ):
        stack.up(["kafka"])
