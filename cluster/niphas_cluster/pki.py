"""Credentials of the node's components: one bearer token per identity (the apiserver's
token file), the service-account signing key, and a kubeconfig per component."""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from .layout import API_SERVICE_IP, CLUSTER_DOMAIN, GATEWAY, NODE_NAME

# (user, groups): RBAC's bootstrap roles and the Node authorizer know these identities.
IDENTITIES = {
    "admin": ("niphas-admin", "system:masters"),
    "kubelet": (f"system:node:{NODE_NAME}", "system:nodes"),
    "controller-manager": ("system:kube-controller-manager", ""),
    "scheduler": ("system:kube-scheduler", ""),
    "kube-proxy": ("system:kube-proxy", ""),
    "dns": ("niphas-node-dns", "system:masters"),
}


@dataclass(frozen=True)
class Credentials:
    tokens: dict[str, str]
    token_file: Path
    sa_key: Path
    ca_file: Path
    """The CA pods trust for the API server (their service-account `ca.crt`)."""
    serving_cert: Path
    serving_key: Path


def write_credentials(work: Path) -> Credentials:
    tokens = {name: secrets.token_hex(16) for name in IDENTITIES}
    lines = []
    for name, (user, groups) in IDENTITIES.items():
        lines.append(
            f'{tokens[name]},{user},{user},"{groups}"'
            if groups
            else f"{tokens[name]},{user},{user}"
        )
    token_file = work / "tokens.csv"
    token_file.write_text("\n".join(lines) + "\n")
    token_file.chmod(0o600)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sa_key = work / "sa.key"
    sa_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    sa_key.chmod(0o600)
    ca_file, serving_cert, serving_key = write_serving_cert(work)
    return Credentials(tokens, token_file, sa_key, ca_file, serving_cert, serving_key)


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_serving_cert(work: Path) -> tuple[Path, Path, Path]:
    """A CA and the API server's certificate for every name it is reached by: loopback and
    the node's gateway (host processes), the `kubernetes` Service (pods)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "niphas-node-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    dns = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"]
    dns.append(f"kubernetes.default.svc.{CLUSTER_DOMAIN}")
    ips = ["127.0.0.1", GATEWAY, API_SERVICE_IP]
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    certs = work / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    ca_file, cert_file = certs / "ca.crt", certs / "apiserver.crt"
    key_file = certs / "apiserver.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(_pem(key))
    key_file.chmod(0o600)
    return ca_file, cert_file, key_file


def write_kubeconfig(path: Path, server: str, ca_file: Path, token: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "niphas", "cluster": {"server": server, "certificate-authority": str(ca_file)}}
        ],
        "users": [{"name": "niphas", "user": {"token": token}}],
        "contexts": [{"name": "niphas", "context": {"cluster": "niphas", "user": "niphas"}}],
        "current-context": "niphas",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path
