"""Export: the predict stage's fitted ensemble, its settings and its checkpoints into one bundle folder
and a zip of it."""

from __future__ import annotations

import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.atomic import atomic_dir, atomic_path
from pipeline.bundle.layout import SPEC_FILE, BundleMember, BundleSpec, library_versions, write_spec
from pipeline.bundle.onnx import export_onnx
from pipeline.config import load_params
from pipeline.data.geometry import padded_shape
from pipeline.data.manifest import read_manifest
from pipeline.digest import sha256_file
from pipeline.ensemble.fit import read_weights
from pipeline.errors import UserError
from pipeline.inference.infer import window_overlap_of
from pipeline.inference.members import checkpoints_and_shares, load_members


@dataclass(frozen=True)
class PredictInputs:
    """What the predict stage reads (its command's flags in dvc.yaml)."""

    models: Path
    weights: Path
    manifest: Path
    params: Path
    refits: Path


@dataclass(frozen=True)
class Exported:
    folder: Path
    zip: Path
    members: list[str]
    left_out: list[str]  # members whose fitted weights are all zero
    checkpoints: int
    graphs: int  # ONNX graphs (0 without --onnx)


def export_bundle(inputs: PredictInputs, out: Path, onnx: bool = False) -> Exported:
    """Write the bundle folder `out` and `out`.zip: the checkpoints of every member with a non-zero
    fitted weight, and `bundle.json` (classes, weights, each member's resolved TTA, the predict and
    submission settings, library versions, each file's SHA-256). With `onnx`, each checkpoint's model
    is also written as an ONNX graph beside it (`predict-bundle --engine onnx`).

    An existing `out` that is not a bundle is refused rather than replaced. Both outputs are written
    under temporary names and renamed, so a failed export leaves the previous bundle as it was.
    """
    if out.exists() and not (out / SPEC_FILE).is_file():
        raise UserError(f"{out}: exists and is not a bundle; name a new folder (it would be replaced)")
    params = load_params(inputs.params)
    manifest = read_manifest(inputs.manifest)
    fitted = read_weights(inputs.weights, manifest.classes)
    kept = [i for i, row in enumerate(fitted.weights) if any(w != 0 for w in row)]
    if not kept:
        raise UserError(f"{inputs.weights}: every member's weights are zero; nothing to export")
    checkpoints, shares = checkpoints_and_shares(inputs.models, inputs.refits, fitted, params.refit)
    kept_names = [fitted.members[i] for i in kept]
    # Loading them resolves each member's TTA exactly as the predict stage does (and checks classes).
    members = load_members(
        {name: checkpoints[name] for name in kept_names}, manifest.classes, params.predict.tta, shares
    )
    model_names = [f"fold{k}" for k in fitted.folds] + (["refit"] if params.refit.enabled else [])

    bundle_members, files = [], {}
    zip_path = out.with_name(out.name + ".zip")
    with atomic_dir(out) as tmp:
        for member in members:
            inside, graphs = [], []
            example = padded_shape(member.folds.geometry.size, member.folds.geometry.size)
            for model_name, source, model in zip(
                model_names, checkpoints[member.name], member.folds.models, strict=True
            ):
                name = f"models/{member.name}/{model_name}.pt"
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, tmp / name)
                inside.append(name)
                if onnx:
                    graph = f"models/{member.name}/{model_name}.onnx"
                    export_onnx(model, example, tmp / graph)
                    graphs.append(graph)
            for name in inside + graphs:
                files[name] = sha256_file(tmp / name)
            geometry = member.folds.geometry.to_dict()
            bundle_members.append(
                BundleMember(member.name, member.tta, geometry, inside, graphs, member.shares)
            )
        spec = BundleSpec(
            classes=list(manifest.classes),
            members=bundle_members,
            weights=[fitted.weights[i] for i in kept],
            decision=fitted.decision.to_json(manifest.classes),
            scales=list(params.predict.scales),
            batch_size=params.predict.batch_size,
            num_workers=params.predict.num_workers,
            amp=params.predict.amp,
            window_overlap=window_overlap_of(params.predict),
            submission_format=params.submission.format,
            rle_order=params.submission.rle_order,
            size=params.submission.size,
            params_sha256=sha256_file(inputs.params),
            versions=library_versions(),
            files=files,
        )
        write_spec(tmp, spec)
        with atomic_path(zip_path) as zip_tmp, zipfile.ZipFile(zip_tmp, "w", zipfile.ZIP_STORED) as archive:
            # Stored, not deflated: checkpoints hardly compress, and a notebook reads the zip faster.
            for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
                archive.write(path, path.relative_to(tmp).as_posix())
    left_out = [name for name in fitted.members if name not in kept_names]
    graphs = sum(len(m.onnx) for m in bundle_members)
    return Exported(out, zip_path, kept_names, left_out, len(files) - graphs, graphs)
