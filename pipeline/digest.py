"""File digests: the SHA-256 by which fingerprints and sidecars name a file's bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.errors import UserError


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks; a missing file is a UserError naming it."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    return digest.hexdigest()
