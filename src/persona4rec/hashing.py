"""File hashing shared by the encoder manifest, adapters and reports (ground floor)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

__all__ = ["file_blake2b", "file_sha256"]


def _file_hexdigest(path: Path, digest: Any, chunk_size: int) -> str:  # any hashlib object
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return str(digest.hexdigest())


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    return _file_hexdigest(path, hashlib.sha256(), chunk_size)


def file_blake2b(path: Path, chunk_size: int = 1 << 22) -> str:
    """Hex 128-bit BLAKE2b of a file, read in chunks (the sharded index's manifest)."""
    return _file_hexdigest(path, hashlib.blake2b(digest_size=16), chunk_size)
