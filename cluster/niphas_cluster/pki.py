"""Credentials of the node's components: one bearer token per identity (the apiserver's
token file), the service-account signing key, and a kubeconfig per component."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .layout import NODE_NAME

# (user, groups): RBAC's bootstrap roles and the Node authorizer know these identities.
IDENTITIES = {
    "admin": ("niphas-admin", "system:masters"),
    "kubelet": (f"system:node:{NODE_NAME}", "system:nodes"),
    "controller-manager": ("system:kube-controller-manager", ""),
    "scheduler": ("system:kube-scheduler", ""),
}


@dataclass(frozen=True)
class Credentials:
    tokens: dict[str, str]
    token_file: Path
    sa_key: Path


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
    return Credentials(tokens, token_file, sa_key)


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
