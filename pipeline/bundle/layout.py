"""A bundle's description (`bundle.json`): what it holds, how to predict with it, checked on reading."""

from __future__ import annotations

import importlib.metadata
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.atomic import write_json
from pipeline.data.images import file_name_problem
from pipeline.digest import sha256_file
from pipeline.ensemble.decision import LabelDecision
from pipeline.errors import UserError

SPEC_FILE = "bundle.json"
FORMAT = "trashseg-bundle"
FORMAT_VERSION = 3  # 2: the label decision (calibration, post-processing); 3: each member's model shares
# The libraries whose versions shape a prediction: a bundle records them, and predicting with others
# is warned about (a changed kernel or TTA can move probabilities), not refused.
LIBRARIES = ("trashseg", "torch", "segmentation-models-pytorch", "timm", "ttach")


@dataclass(frozen=True)
class BundleMember:
    """One ensemble member: its resolved TTA, its input geometry, its fold checkpoints (paths inside the
    bundle) and their ONNX graphs when the bundle was exported with them (else empty)."""

    name: str
    tta: str
    geometry: dict[str, Any]  # how it is fed an image (`Geometry.to_dict`), as its checkpoints record
    checkpoints: list[str]
    onnx: list[str]
    shares: list[float] | None  # each checkpoint's share of the member (a refit model's is set); None: equal


@dataclass(frozen=True)
class BundleSpec:
    """Everything `predict-bundle` needs besides the checkpoints' bytes."""

    classes: list[str]  # background first
    members: list[BundleMember]
    weights: list[list[float]]  # (members, classes): the ensemble stage's fitted weights
    decision: dict[str, Any]  # `LabelDecision.to_json`: calibration and post-processing
    scales: list[float]
    batch_size: int
    num_workers: int
    amp: bool
    window_overlap: float | None  # None: whole images; else sliding windows with this overlap
    submission_format: str
    rle_order: str
    size: int | None  # submission masks' side; None: each image's own size
    params_sha256: str  # of the params file the predict stage read
    versions: dict[str, str | None]
    files: dict[str, str]  # path inside the bundle -> sha256


def library_versions() -> dict[str, str | None]:
    """The installed version of each of LIBRARIES (None where not installed)."""
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_spec(folder: Path, spec: BundleSpec) -> None:
    """Write `spec` as `folder/bundle.json`."""
    write_json(folder / SPEC_FILE, {"format": FORMAT, "version": FORMAT_VERSION, **asdict(spec)})


def read_spec(folder: Path) -> BundleSpec:
    """`folder/bundle.json`, checked: its format, its shape, and every file it names present with the
    recorded SHA-256. Anything else is a one-line UserError naming the file; other library versions
    than the recorded ones are a warning on stderr."""
    path = folder / SPEC_FILE
    if not path.is_file():
        raise UserError(
            f"{folder}: not a trashseg bundle (no {SPEC_FILE}); make one with `python -m pipeline export`"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise UserError(f"{path}: not a trashseg bundle description")
    if raw.get("version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: bundle format version {raw.get('version')}, this trashseg reads {FORMAT_VERSION}"
        )
    try:
        members = [
            BundleMember(
                str(m["name"]),
                str(m["tta"]),
                dict(m["geometry"]),
                [str(c) for c in m["checkpoints"]],
                [str(c) for c in m["onnx"]],
                None if m["shares"] is None else [float(x) for x in m["shares"]],
            )
            for m in raw["members"]
        ]
        fields = {key: raw[key] for key in BundleSpec.__dataclass_fields__ if key != "members"}
        spec = BundleSpec(members=members, **fields)
    except (KeyError, TypeError) as exc:
        raise UserError(f"{path}: incomplete bundle description (missing or malformed {exc})") from None
    _check_shape(path, spec)
    for name, digest in spec.files.items():
        problem = file_name_problem(name)
        if problem is not None:
            raise UserError(f"{path}: file {name!r} {problem}")
        file = folder / name
        if not file.is_file():
            raise UserError(f"{file}: missing from the bundle")
        if sha256_file(file) != digest:
            raise UserError(
                f"{file}: SHA-256 differs from the one {SPEC_FILE} records (changed or damaged); export again"
            )
    _warn_on_versions(path, spec.versions)
    return spec


def label_decision(spec: BundleSpec) -> LabelDecision:
    """The bundle's `LabelDecision` (`read_spec` has checked it parses)."""
    return LabelDecision.from_json(spec.decision, spec.classes)


def _check_shape(path: Path, spec: BundleSpec) -> None:
    try:
        label_decision(spec)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{path}: malformed label decision ({exc})") from None
    if not spec.members:
        raise UserError(f"{path}: no members")
    if len(spec.weights) != len(spec.members) or any(len(row) != len(spec.classes) for row in spec.weights):
        raise UserError(f"{path}: weights are not one row per member and one column per class")
    if any(m.shares is not None and len(m.shares) != len(m.checkpoints) for m in spec.members):
        raise UserError(f"{path}: a member's shares are not one per checkpoint")
    unlisted = [c for m in spec.members for c in m.checkpoints + m.onnx if c not in spec.files]
    if any(m.onnx and len(m.onnx) != len(m.checkpoints) for m in spec.members):
        raise UserError(f"{path}: a member has ONNX graphs for some of its folds only")
    if unlisted or any(not m.checkpoints for m in spec.members):
        raise UserError(f"{path}: a member's file is not among the bundle's files ({unlisted[:1]})")


def _warn_on_versions(path: Path, recorded: dict[str, Any]) -> None:
    installed = library_versions()
    differ = [
        f"{name} {recorded.get(name)} -> {installed[name]}"
        for name in LIBRARIES
        if recorded.get(name) is not None and recorded.get(name) != installed[name]
    ]
    if differ:
        print(
            f"warning: {path}: exported with other library versions ({'; '.join(differ)}): "
            "predictions may differ slightly from the workspace's",
            file=sys.stderr,
        )
