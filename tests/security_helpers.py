"""Test PKI made at test time (never committed keys): a CA, a server certificate for loopback
and client certificates, written as PEM files; and token/auth-file helpers."""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvrouter.security.channels import ClientSecurity
from kvrouter.security.tls import TlsFiles


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


@dataclass
class Pki:
    """A CA in `directory` that issues server and client certificates."""

    directory: Path
    ca_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @classmethod
    def create(cls, directory: Path, name: str = "kvrouter test CA") -> Pki:
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        pki = cls(directory, cert, key)
        pki.ca.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return pki

    def issue(self, cn: str, *, server: bool = False, client: bool = False,
              dns: tuple[str, ...] = ()) -> tuple[Path, Path]:
        """(certificate, key) files for `cn`; a server certificate names localhost and
        127.0.0.1 (and `dns`)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        usages = [u for u, on in ((ExtendedKeyUsageOID.SERVER_AUTH, server),
                                  (ExtendedKeyUsageOID.CLIENT_AUTH, client)) if on]
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        if server:
            sans += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        if client and not sans:
            sans.append(x509.DNSName(cn))
        builder = (x509.CertificateBuilder().subject_name(_name(cn))
                   .issuer_name(self.ca_cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                   .add_extension(x509.SubjectAlternativeName(sans), critical=False))
        cert = builder.sign(self.ca_key, hashes.SHA256())
        cert_path = self.directory / f"{cn}.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, _write_key(self.directory / f"{cn}.key", key)

    def server_env(self, cert: Path, key: Path, *, client_auth: bool = False) -> dict[str, str]:
        """KVROUTER_TLS_* for a process serving `cert` and trusting this CA."""
        env = {"KVROUTER_TLS_CERT": str(cert), "KVROUTER_TLS_KEY": str(key),
               "KVROUTER_TLS_CA": str(self.ca)}
        if client_auth:
            env["KVROUTER_TLS_CLIENT_AUTH"] = "1"
        return env

    def client(self, cert: Path | None = None, key: Path | None = None,
               token: str | None = None) -> ClientSecurity:
        return ClientSecurity(tls=TlsFiles(cert=cert, key=key, ca=self.ca), token=token)


def new_token() -> str:
    return secrets.token_urlsafe(24)


def write_auth_file(path: Path, principals: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"principals": principals}))
    return path
