"""VAPID keys (RFC 8292) for Web Push in development: generated once, kept in the state dir."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


@dataclass(frozen=True)
class VapidKeys:
    """Where the private key lives (PEM) and the public key the web app subscribes with."""

    private_key_file: Path
    public_key: str  # base64url of the uncompressed P-256 point (applicationServerKey)


def public_key_of(private_key: ec.EllipticCurvePrivateKey) -> str:
    """The base64url ``applicationServerKey`` of a VAPID private key."""
    raw = private_key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def ensure_vapid_keys(directory: Path) -> VapidKeys:
    """Load ``directory/vapid_private.pem``, generating it first if it does not exist.

    Kept between runs: browsers subscribed with the public key keep receiving pushes.
    """
    path = Path(directory) / "vapid_private.pem"
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.touch(mode=0o600)
        path.write_bytes(pem)
    return VapidKeys(path, public_key_of(key))
