"""Predict from a bundle: a submission CSV for a folder of images or a test json, with no DVC workspace,
inside a time limit."""

from __future__ import annotations

import contextlib
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.bundle.layout import BundleSpec, label_decision, read_spec
from pipeline.bundle.onnx import CPU, OnnxModel
from pipeline.data.coco import load_image_list
from pipeline.data.geometry import Geometry
from pipeline.data.images import images_in_folder
from pipeline.data.manifest import ImageSet
from pipeline.data.records import ImageRecord
from pipeline.errors import UserError
from pipeline.evaluation.sidecar import describe, write_sidecar
from pipeline.evaluation.submission import write_submission
from pipeline.inference.infer import (
    Ensemble,
    Member,
    inference_device,
    labelled_masks,
    load_ensemble,
    predict_members,
)

ENGINES = ("torch", "onnx")


@dataclass(frozen=True)
class Predicted:
    out: Path
    sidecar: Path
    images: int
    rows: int
    seconds: float


def predict_bundle(
    bundle: Path,
    images: Path,
    out: Path,
    root: Path | None = None,
    time_limit: float | None = None,
    device: torch.device | None = None,
    engine: str = "torch",
) -> Predicted:
    """Write the submission `out` (and its sidecar) for `images` with the ensemble in `bundle` (its
    folder or its zip), as the predict stage would have.

    `images`: a COCO json listing the test images (read from `root`, default the json's folder, in
    the json's order), or a folder of image files (in name order). `time_limit` (seconds, counted from
    the call): after the first batch the projected total is printed; if it exceeds the limit, or the
    limit passes, the run stops with a UserError and `out` is not written. `engine`: "torch", or "onnx"
    (onnxruntime on the CPU, the bundle's ONNX graphs in place of the torch models; TTA, scales and
    merging unchanged).
    """
    if engine not in ENGINES:
        raise UserError(f"--engine {engine!r} is unknown (valid: {', '.join(ENGINES)})")
    started = time.monotonic()
    with unpacked(bundle) as folder:
        return _predict(folder, bundle, images, out, root, time_limit, device, engine, started)


@contextlib.contextmanager
def unpacked(bundle: Path) -> Iterator[Path]:
    """The bundle's folder: `bundle` itself, or its zip extracted into a temporary folder for the body."""
    if bundle.is_file() and zipfile.is_zipfile(bundle):
        with tempfile.TemporaryDirectory(prefix="trashseg-bundle-") as folder:
            with zipfile.ZipFile(bundle) as archive:
                archive.extractall(folder)  # drops absolute and `..` parts of member names
            yield Path(folder)
    elif bundle.is_dir():
        yield bundle
    else:
        raise UserError(f"{bundle}: not a bundle folder or zip")


def read_test_images(images: Path, root: Path | None) -> tuple[list[ImageRecord], Path]:
    """The test records and the folder their file names are relative to, from a test json or a folder."""
    if images.is_dir():
        if root is not None:
            raise UserError(f"{images}: --root is for a test json; a folder's images are read from it")
        found = images_in_folder(images)
        return [ImageRecord(i, name, h, w) for i, (name, h, w) in enumerate(found)], images
    if not images.is_file():
        raise UserError(f"{images}: not found (a test json or a folder of images)")
    return load_image_list(images), images.parent if root is None else root


def _predict(
    folder: Path,
    bundle: Path,
    images: Path,
    out: Path,
    root: Path | None,
    time_limit: float | None,
    device: torch.device | None,
    engine: str,
    started: float,
) -> Predicted:
    spec = read_spec(folder)
    test, image_root = read_test_images(images, root)
    members = bundle_members(folder, spec, engine, bundle)
    described = ", ".join(f"{m.name} ({len(m.folds.models)} folds, TTA {m.tta})" for m in members)
    print(f"{bundle}: {described}; engine {engine}")
    if engine == "onnx":
        device = torch.device("cpu")  # the CPU execution provider: inputs and outputs stay on the CPU
    stream = predict_members(
        members,
        torch.tensor(spec.weights, dtype=torch.float32),
        image_root,
        test,
        spec.scales,
        spec.batch_size,
        spec.num_workers,
        device or inference_device(),
        spec.amp,
        spec.window_overlap,
    )
    n_models = sum(len(m.folds.models) for m in members)
    stream = tqdm(stream, desc=f"predict ({n_models} models)", total=len(test), unit="image")
    if time_limit is not None:
        stream = within_time_limit(stream, len(test), time_limit, started, spec.batch_size)
    masks = labelled_masks(stream, test, spec.size, label_decision(spec).labels)
    target = ImageSet(test, len(spec.classes))
    rows = write_submission(masks, out, spec.submission_format, spec.rle_order, target, spec.size)
    encoding = describe(
        out, spec.submission_format, spec.rle_order, spec.size, spec.classes, spec.params_sha256
    )
    sidecar = write_sidecar(out, encoding)
    return Predicted(out, sidecar, len(test), rows, time.monotonic() - started)


def bundle_members(
    folder: Path, spec: BundleSpec, engine: str, source: Path | None = None, provider: str = CPU
) -> list[Member]:
    """The members of the bundle unpacked at `folder` (`spec` its checked description), their fold models
    as torch modules or, for `engine` "onnx", onnxruntime sessions of their ONNX graphs. `source` (the
    folder or zip the user named) is what error messages name; default `folder`. `provider`: the
    onnxruntime execution provider of the ONNX engine."""
    members = []
    for member in spec.members:
        if engine == "onnx":
            if not member.onnx:
                raise UserError(
                    f"{source or folder}: member {member.name} has no ONNX graphs; export with --onnx"
                )
            # The graphs replace the torch models: no checkpoint is loaded (half the peak memory). Classes
            # and geometry come from the checked description; the TTA is already resolved.
            threads = torch.get_num_threads()
            models: list[torch.nn.Module] = [OnnxModel(folder / g, threads, provider) for g in member.onnx]
            folds = Ensemble(models, list(spec.classes), Geometry.from_dict(member.geometry), [])
        else:
            paths = [folder / name for name in member.checkpoints]
            folds = load_ensemble(paths)
            if folds.classes != spec.classes:
                raise UserError(
                    f"{paths[0]}: classes {folds.classes} differ from the bundle's {spec.classes}"
                )
            if folds.geometry.to_dict() != member.geometry:
                raise UserError(
                    f"{paths[0]}: geometry {folds.geometry} differs from the bundle's {member.geometry}"
                )
        members.append(Member(member.name, folds, member.tta, member.shares))
    return members


def within_time_limit(
    stream: Iterable[tuple[int, torch.Tensor]],
    total: int,
    limit: float,
    started: float,
    first: int,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[tuple[int, torch.Tensor]]:
    """`stream` (one item per image, `total` of them) while it can finish within `limit` seconds of
    `started` (a `clock` reading).

    After the `first` images the projected total (the time before the first image, plus the per-image
    time so far times `total`) is printed; from then on a projection over the limit, or the limit
    itself passing, stops the stream with a UserError saying so.
    """
    begun = clock()
    first = min(first, total)
    for done, item in enumerate(stream, 1):
        yield item
        now = clock()
        projected = (begun - started) + (now - begun) / done * total
        if done == first:
            print(
                f"time: {done} of {total} images after {now - started:.1f} s; projected {projected:.0f} s "
                f"of the {limit:g} s limit"
            )
        if now - started > limit or (done >= first and projected > limit):
            raise UserError(
                f"--time-limit {limit:g} s: {done} of {total} images took {now - started:.1f} s, projected "
                f"total {projected:.0f} s; stopped, no submission written"
            )
