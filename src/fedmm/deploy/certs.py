"""TLS certificates and SuperNode authentication keys for a Flower deployment.

Two independent mechanisms protect a real federation (Flower 1.41):

* **TLS** encrypts every connection to the SuperLink and lets SuperNodes and ``flwr`` verify its
  identity.  We make a private certificate authority (``ca.crt``/``ca.key``) and a server
  certificate (``server.pem``/``server.key``) signed by it for the SuperLink's host names and IP
  addresses (``--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile`` on ``flower-superlink``,
  ``--root-certificates ca.crt`` on ``flower-supernode``, ``root-certificates`` for ``flwr``).
* **SuperNode authentication**: each SuperNode holds an EC P-384 key pair in OpenSSH format
  (``supernode-K``/``supernode-K.pub``); the SuperLink, started with ``--enable-supernode-auth``,
  only lets in nodes whose public key was registered with ``flwr supernode register KEY.pub``.
  The private key never leaves its site.

Same files as the ``openssl``/``ssh-keygen`` recipe in Flower's docs, made with ``cryptography``
so no external tool is needed.  ``fedmm certs`` (CLI) and ``scripts/generate_certs.sh`` call
``generate``.  Keys are written 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

log = logging.getLogger(__name__)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def generate_tls(out: Path, hosts: list[str], days: int = 365) -> dict[str, Path]:
    """A CA and a SuperLink server certificate valid for ``hosts`` (DNS names or IPs)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmm federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                          key_agreement=False, encipher_only=False, decipher_only=False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    paths = {
        "ca_cert": out / "ca.crt",
        "ca_key": out / "ca.key",
        "server_cert": out / "server.pem",
        "server_key": out / "server.key",
    }
    _write(paths["ca_cert"], ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(paths["ca_key"], _key_pem(ca_key), private=True)
    _write(paths["server_cert"], server_cert.public_bytes(serialization.Encoding.PEM))
    _write(paths["server_key"], _key_pem(server_key), private=True)
    return paths


def generate_supernode_keys(out: Path, n: int) -> list[tuple[Path, Path]]:
    """``n`` EC P-384 key pairs in OpenSSH format: ``supernode-K`` (private), ``.pub``."""
    pairs = []
    for k in range(n):
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )  # fmt: skip
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        priv_path, pub_path = out / f"supernode-{k}", out / f"supernode-{k}.pub"
        _write(priv_path, private, private=True)
        _write(pub_path, public + f" fedmm-supernode-{k}\n".encode())
        pairs.append((priv_path, pub_path))
    return pairs


def generate(out: str | Path, supernodes: int, hosts: list[str] | None = None) -> dict:
    """TLS files and ``supernodes`` auth key pairs under ``out``; returns their paths."""
    out = Path(out)
    hosts = hosts or ["localhost", "127.0.0.1", "::1"]
    paths: dict = generate_tls(out, hosts)
    paths["supernode_keys"] = generate_supernode_keys(out, supernodes)
    log.info("wrote TLS files and %d SuperNode key pairs to %s", supernodes, out)
    return paths
