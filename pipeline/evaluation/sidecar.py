"""A submission's sidecar: how its CSV was encoded (format, RLE pixel order, size), which the CSV cannot say.

Kaggle reads the CSV alone, so nothing may be added to it: both RLE orders share one header, and a
row-major file scored as column-major gives a wrong score without an error. `predict` therefore writes
`NAME.json` beside `NAME.csv`, holding the encoding, the classes, the params hash and the CSV's own
SHA-256; `validate`, `score` and the leaderboard stage read it, refuse a CSV it does not describe or
settings that contradict it, and warn loudly when there is none.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pipeline.atomic import write_json
from pipeline.digest import sha256_file
from pipeline.errors import UserError

VERSION = 1


def sidecar_path(submission: Path) -> Path:
    """Where the sidecar of `submission` lives: the same name with `.json`."""
    return submission.with_suffix(".json")


def describe(
    submission: Path, fmt: str, order: str, size: int | None, classes: list[str], params_sha256: str
) -> dict[str, Any]:
    """The sidecar's content for the CSV at `submission` as it is now."""
    return {
        "version": VERSION,
        "submission": submission.name,
        "sha256": sha256_file(submission),
        "format": fmt,
        "rle_order": order if fmt == "rle" else None,
        "size": size,
        "classes": list(classes),
        "params_sha256": params_sha256,
    }


def write_sidecar(submission: Path, description: dict[str, Any]) -> Path:
    """Write `description` (from `describe`) beside `submission`, atomically; returns its path."""
    path = sidecar_path(submission)
    write_json(path, description)
    return path


def read_sidecar(submission: Path) -> dict[str, Any] | None:
    """The sidecar describing `submission`, or None if there is none. One-line UserErrors for one that
    cannot be read or that describes another file (the CSV changed after predict wrote both)."""
    path = sidecar_path(submission)
    if not path.is_file():
        return None
    try:
        description = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable submission sidecar ({exc})") from None
    keys = {"version", "sha256", "format", "rle_order", "size", "classes"}
    if not isinstance(description, dict) or not keys <= set(description):
        raise UserError(f"{path}: not a submission sidecar (it needs the keys {', '.join(sorted(keys))})")
    if submission.is_file() and description["sha256"] != sha256_file(submission):
        raise UserError(
            f"{path}: describes another file than {submission} (its SHA-256 differs): the CSV changed after "
            "predict wrote both; re-run predict, or delete the sidecar and give --order and --size"
        )
    return description


def resolve_encoding(
    submission: Path, order: str | None, size: int | None, default_order: str, *, size_given: bool
) -> tuple[str, int | None]:
    """The (RLE order, size) to read `submission` with: its sidecar's, which an explicit `order` or a
    `size_given` that contradicts it is refused against; without a sidecar, `order` or `default_order`
    and `size`, with a warning on stderr that nothing checks them."""
    description = read_sidecar(submission)
    if description is None:
        chosen = order or default_order
        print(
            f"warning: {submission}: no sidecar {sidecar_path(submission).name}; reading it as RLE "
            f"{chosen}-major at size {_size_text(size)}, unchecked (a file written in the other order "
            "scores wrongly without an error)",
            file=sys.stderr,
            flush=True,
        )
        return chosen, size
    path = sidecar_path(submission)
    recorded_order, recorded_size = description["rle_order"] or default_order, description["size"]
    if order is not None and description["format"] == "rle" and order != recorded_order:
        raise UserError(f"{path}: the submission is RLE {recorded_order}-major, not {order}-major as asked")
    if size_given and size != recorded_size:
        raise UserError(
            f"{path}: the submission's masks are at size {_size_text(recorded_size)}, "
            f"not {_size_text(size)} as asked"
        )
    return recorded_order, recorded_size


def _size_text(size: int | None) -> str:
    return "native" if size is None else f"{size}x{size}"
