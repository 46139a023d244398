"""Device and coordinator HMAC keys, read from files or the environment (never from flags or logs).

A key file holds the key as hex text (at least 16 bytes, i.e. 32 hex digits); a key ring is a folder
of ``CLIENT.key`` files, one per device, that the coordinator reads to verify each device's updates.
"""

from __future__ import annotations

import os
from pathlib import Path

from protocol.topics import validate_id

MIN_KEY_BYTES = 16
KEY_SUFFIX = ".key"


class KeyFileError(ValueError):
    """A key file or key ring that cannot be used (missing, not hex, too short)."""


def parse_key(text: str, source: str) -> bytes:
    """A key from its hex text; ``source`` names where it came from, for the error message only."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise KeyFileError(f"{source}: a key must be hex text") from None
    if len(key) < MIN_KEY_BYTES:
        raise KeyFileError(f"{source}: a key needs at least {MIN_KEY_BYTES} bytes, got {len(key)}")
    return key


def read_key(spec: str | Path) -> bytes:
    """A key from ``env:NAME`` (an environment variable) or from a file path."""
    text = str(spec)
    if text.startswith("env:"):
        name = text[4:]
        if name not in os.environ:
            raise KeyFileError(f"environment variable {name} (named for a key) is not set")
        return parse_key(os.environ[name], f"${name}")
    path = Path(text)
    if not path.is_file():
        raise KeyFileError(f"key file not found: {path}")
    return parse_key(path.read_text(), str(path))


def read_keyring(folder: str | Path) -> dict[str, bytes]:
    """``client id -> key`` from every ``CLIENT.key`` file of ``folder``."""
    root = Path(folder)
    if not root.is_dir():
        raise KeyFileError(f"key ring folder not found: {root}")
    ring = {}
    for path in sorted(root.glob(f"*{KEY_SUFFIX}")):
        client = validate_id(path.name[: -len(KEY_SUFFIX)], "client id")
        ring[client] = parse_key(path.read_text(), str(path))
    return ring


def write_key(path: Path, key: bytes) -> None:
    """Write ``key`` as hex to a new 0600 file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
