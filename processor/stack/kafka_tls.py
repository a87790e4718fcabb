"""The certificates of the secured local Kafka (`stack up --secure`), made once per state folder.

In ``<STACK_DIR>/kafka-tls/`` (``KafkaTlsFiles`` names them):

    ca.pem             the throwaway CA that signed the others: what clients trust
                       (KAFKA_SSL_CA_LOCATION), and what the broker checks client certificates
                       against; its key is not kept, since nothing is issued later
    broker.p12         PKCS12 keystore: the broker's key and certificate, valid for 127.0.0.1
                       and localhost, for serving and as its own client certificate
    keystore-password  that keystore's password
    client.pem         a client certificate the CA signed, for the mutual-TLS listener
    client-key.pem     its key (PEM, PKCS#8, not encrypted)
    other-ca.pem       an unrelated CA: trusting it instead of ca.pem must fail the handshake

Files holding a key or a password are mode 0600; the folder is 0700. The files are made as one
set: when any is missing, all are made anew (a broker started afterwards serves the new ones).

Only this module needs ``cryptography`` (of the ``stack`` extra); it is imported when a secured
node is first prepared, so the CLI runs without it.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    pkcs12,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from processor.stack.layout import KafkaTlsFiles, write_file

BROKER_DNS_NAMES = ("localhost",)
BROKER_IP_ADDRESSES = ("127.0.0.1",)
BROKER_KEY_ALIAS = "broker"
CLIENT_COMMON_NAME = "trace-processor-stack-client"
# Long enough never to expire under a state folder; it is thrown away with it.
_VALIDITY = timedelta(days=3650)
# Valid from a little before now, so a client whose clock lags ours still accepts them.
_BACKDATE = timedelta(hours=1)


@dataclass(frozen=True)
class Issued:
    """A key and the certificate for it."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate


def issue_ca(common_name: str, *, now: datetime) -> Issued:
    """A self-signed CA that may sign end-entity certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    public = key.public_key()
    certificate = (
        _validity(x509.CertificateBuilder(), now)
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(key, certificate)


def issue_certificate(
    issuer: Issued,
    common_name: str,
    *,
    now: datetime,
    usages: Sequence[x509.ObjectIdentifier],
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
) -> Issued:
    """An end-entity certificate ``issuer`` signs, for the extended key ``usages`` given, naming
    ``dns_names`` and ``ip_addresses`` as subject alternative names (what hostname checks read).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    builder = (
        _validity(x509.CertificateBuilder(), now)
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(issuer.certificate.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(address)) for address in ip_addresses]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return Issued(key, builder.sign(issuer.key, hashes.SHA256()))


def _validity(builder: x509.CertificateBuilder, now: datetime) -> x509.CertificateBuilder:
    return builder.not_valid_before(now - _BACKDATE).not_valid_after(now + _VALIDITY)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def pkcs12_keystore(issued: Issued, chain: Sequence[x509.Certificate], password: str) -> bytes:
    """A PKCS12 keystore Java reads: one key entry, its certificate followed by ``chain``.

    Encrypted with PBES2 (AES-256, PBKDF2) and an HMAC-SHA256 MAC, which Java reads since 11.
    """
    encryption = (
        PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(10_000)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(password.encode())
    )
    return pkcs12.serialize_key_and_certificates(
        BROKER_KEY_ALIAS.encode(), issued.key, issued.certificate, list(chain), encryption
    )


def certificate_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(Encoding.PEM)


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def ensure_tls_files(files: KafkaTlsFiles, *, now: datetime) -> bool:
    """Make the files unless all are there already; True when they were made now."""
    if files.complete():
        return False
    files.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Out with a partial set first: a crash while writing then leaves it incomplete, and
    # the next call starts over instead of mixing keys of two runs.
    for path in files.paths:
        path.unlink(missing_ok=True)
    ca = issue_ca("trace-processor stack CA", now=now)
    broker = issue_certificate(
        ca,
        "trace-processor stack broker",
        now=now,
        # clientAuth too: the broker presents it when it connects to a broker.
        usages=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
        dns_names=BROKER_DNS_NAMES,
        ip_addresses=BROKER_IP_ADDRESSES,
    )
    client = issue_certificate(
        ca, CLIENT_COMMON_NAME, now=now, usages=(ExtendedKeyUsageOID.CLIENT_AUTH,)
    )
    other_ca = issue_ca("an unrelated CA", now=now)
    password = secrets.token_hex(16)
    keystore = pkcs12_keystore(broker, [ca.certificate], password)
    write_file(files.keystore_password_path, f"{password}\n".encode(), private=True)
    write_file(files.broker_keystore, keystore, private=True)
    write_file(files.client_key, private_key_pem(client.key), private=True)
    write_file(files.client_certificate, certificate_pem(client.certificate), private=False)
    write_file(files.other_ca, certificate_pem(other_ca.certificate), private=False)
    write_file(files.ca, certificate_pem(ca.certificate), private=False)
    return True
