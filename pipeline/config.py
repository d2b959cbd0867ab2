"""Params: one pydantic model per params.yaml section, the only place defaults live; strict loading."""

from __future__ import annotations

import copy
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from pipeline.errors import UserError

# host:port, the host a name, an IPv4 address or a bracketed IPv6 one ("[::1]:29500").
_ENDPOINT = re.compile(r"([^\s:\[\]]+|\[[0-9A-Fa-f:.]+\]):([0-9]+)")
_RECIPE_NAME = re.compile(r"[A-Za-z0-9_]+")
RECIPE_SECTIONS = ("model", "augment", "train")


class Section(BaseModel):
    """A params.yaml section: frozen, no unknown keys, no coercion (an int is still taken for a float)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


def _probability(default: float, description: str = "") -> Any:
    return Field(default, ge=0, le=1, description=description)


class DemoParams(Section):
    """The generated demo dataset (stage `demo`)."""

    seed: int = Field(0, ge=0)
    n_train: int = Field(300, ge=1)
    n_test: int = Field(80, ge=0)
    image_size: int = Field(
        512, ge=32, description="the competition's photos are 512; the demo is smaller to train on a CPU"
    )
    max_objects: int = Field(5, ge=1)
    jpeg_quality: int = Field(92, ge=1, le=100)


class DataParams(Section):
    """Where the COCO data is and how annotations become masks (stage `masks`)."""

    root: str = Field("data/demo", description="images are read from root/file_name")
    train_json: str = "data/demo/train.json"
    test_json: str = "data/demo/test.json"
    # dvc.yaml interpolates this into the leaderboard stage's deps, so it must be a path, never null.
    test_truth_json: str = Field(
        "data/demo/test_truth.json", description="no test truth (the competition): the test json again"
    )
    overlap: Literal["area_desc", "max_class"] = Field(
        "area_desc", description="area_desc: larger objects first, small ones stay on top | max_class"
    )
    on_bad_annotation: Literal["error", "skip"] = Field("error", description="error | skip (counted)")
    unused_categories: Literal["keep", "drop"] = Field(
        "keep", description="categories no training annotation uses: keep (indexes never shift) | drop"
    )
    # Decompression bombs: a tiny file can claim gigapixels. PIL refuses more than this by itself.
    max_image_pixels: int = Field(
        178_956_970, ge=1, le=178_956_970, description="refuse an image of more pixels (height x width)"
    )


class SplitParams(Section):
    """Multi-label stratified K-fold (stage `split`)."""

    n_splits: int = Field(5, ge=2)
    seed: int = Field(42, ge=0)


class AugmentParams(Section):
    """Training augmentation, including rare-class-weighted elastic deformation."""

    size: int = Field(512, gt=0, description="training resolution (divisible by 32)")
    resize: Literal["squash", "crop"] = Field(
        "squash", description="squash: resize to size x size | crop: keep the aspect, random crops"
    )
    short_side: int | None = Field(
        None, gt=0, description="crop: short side the image is scaled to first (null = size)"
    )
    hflip: float = _probability(0.5)
    vflip: float = _probability(0.0)
    rot90: float = _probability(0.0, "random 90-degree rotations (d4 TTA needs them)")
    shift_scale_rotate: float = _probability(0.5)
    color: float = _probability(0.3)
    elastic_p_min: float = _probability(0.1, "elastic probability of an image holding only common classes")
    elastic_p_max: float = _probability(0.8, "... and of one holding the rarest class")
    elastic_gamma: float = Field(0.5, ge=0, description="rarity weight = (1 / class frequency) ** gamma")
    elastic_alpha: float = Field(
        400.0, ge=0, description="albumentations' meaning: displacement = alpha * smoothed noise"
    )
    elastic_sigma: float = Field(10.0, gt=0)
    elastic_impl: Literal["fast", "albumentations"] = Field(
        "fast", description="fast (coarse-grid displacement) | albumentations"
    )
    oversample: bool = Field(False, description="rare-class oversampling with the same rarity weights")
    copy_paste: float = _probability(
        0.0, "probability a training image gets objects pasted from the fold's training images (0: off)"
    )
    copy_paste_max: int = Field(3, ge=1, description="objects per pasted image (1..max), drawn class first")
    copy_paste_scale: list[float] = Field(
        default_factory=lambda: [0.75, 1.25], description="[low, high] size factor of a pasted object"
    )
    copy_paste_hflip: float = _probability(0.5)
    copy_paste_placement: Literal["anywhere", "background"] = Field(
        "background", description="background: the try covering least foreground | anywhere"
    )

    @field_validator("copy_paste_scale")
    @classmethod
    def _scale_range(cls, value: list[float]) -> list[float]:
        if len(value) != 2 or not 0 < value[0] <= value[1]:
            raise ValueError("[low, high] with 0 < low <= high")
        return value


class ModelParams(Section):
    """The segmentation-models-pytorch model."""

    arch: str = "Unet"
    encoder: str = "resnet34"
    encoder_weights: str | None = Field(None, description="null | imagenet | path/to/local_weights.pth")
    decoder_channels: list[int] | None = Field(None, description="null: the architecture's default")
    from_pretrained: str | None = Field(
        None, description="a folder saved by smp's save_pretrained (or a hub id): whole-model weights"
    )
    options: dict[str, bool | int | float | str | None] = Field(
        default_factory=dict,
        description="more architecture settings: {deep_supervision: true} (UnetPlusPlus, UNet3Plus), "
        "{cgm: true, cgm_gate: true} (UNet3Plus)",
    )

    @field_validator("decoder_channels")
    @classmethod
    def _channels(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or any(c < 1 for c in value)):
            raise ValueError("non-empty, all at least 1")
        return value


def _weights_rule(values: list[float]) -> None:
    if not (all(w >= 0 for w in values) and any(w > 0 for w in values)):
        raise ValueError("all >= 0, some > 0")


class TrainParams(Section):
    """The training loop of one (model, fold): only settings that shape the trained weights."""

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(8, ge=1)
    accumulate: int = Field(1, ge=1)
    lr: float = Field(3e-4, gt=0)
    encoder_lr: float | None = Field(None, gt=0, description="null: train.lr")
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="cosine (to 0 after warmup) | constant"
    )
    grad_clip: float | None = Field(1.0, gt=0)
    losses: dict[str, float] = Field(default_factory=lambda: {"ce": 1.0, "dice": 1.0})
    class_weights: list[float] | None = None
    side_weights: list[float] | None = Field(
        None, description="deep supervision: loss weight of each side output, deepest last (null: 1.0 each)"
    )
    presence_weight: float = Field(
        1.0, ge=0, description="UNet3Plus cgm: BCE weight of the class-presence head"
    )
    boundary_w0: float = Field(
        0.0, ge=0, description="U-Net boundary weight map on the CE loss (0: off): w0 exp(-(d1+d2)^2/2s^2)"
    )
    boundary_sigma: float = Field(5.0, gt=0, description="pixels at the training size")
    boundary_class_balance: bool = False
    amp: bool = Field(True, description="bf16/fp16 on CUDA; CPU runs fp32 (see cpu_bf16)")
    channels_last: bool = True
    cpu_bf16: bool = Field(
        False, description="CPU with native bf16 (AVX512-BF16/AMX): bf16 autocast + channels_last"
    )
    compile: bool = False
    val_every: int = Field(1, ge=1, description="validate every N epochs (always after the last)")
    ema: float | None = Field(
        None, gt=0, lt=1, description="EMA decay per step: validated and saved in best.pt instead"
    )
    average_top_k: int = Field(
        1, ge=1, description="best.pt: the average of the k best validated epochs' weights (1: the best)"
    )
    seed: int = Field(42, ge=0)
    max_batches: int | None = Field(None, ge=1)

    @field_validator("losses")
    @classmethod
    def _losses(cls, value: dict[str, float]) -> dict[str, float]:
        try:
            _weights_rule(list(value.values()))
        except ValueError:
            raise ValueError("weights all >= 0, some > 0") from None
        return value

    @field_validator("class_weights")
    @classmethod
    def _class_weights(cls, value: list[float] | None) -> list[float] | None:
        if value is not None:
            _weights_rule(value)
        return value

    @field_validator("side_weights")
    @classmethod
    def _side_weights(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and any(w < 0 for w in value):
            raise ValueError("all >= 0")
        return value


def split_endpoint(value: str) -> tuple[str, int] | None:
    """Split "host:port" into (host, port); None if `value` has another shape or a port outside 1-65535."""
    match = _ENDPOINT.fullmatch(value)
    if match is None or not 0 < int(match[2]) < 2**16:
        return None
    return match[1], int(match[2])


class RuntimeParams(Section):
    """How stages run, not what they compute: editing these re-runs nothing and keeps resume state."""

    nproc: int = Field(1, ge=1, description="GPUs (or CPU processes) per train stage, torchrun + DDP")
    num_workers: int = Field(4, ge=0, description="training and validation loader workers")
    nnodes: int = Field(1, ge=1, description="machines per train stage: above 1, the stage runs on each")
    rdzv_endpoint: str | None = Field(
        None, description="host:port of node 0 when nnodes > 1 (env TRASHSEG_RDZV_ENDPOINT overrides)"
    )

    @field_validator("rdzv_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and split_endpoint(value) is None:
            raise ValueError("host:port of node 0 (port 1-65535)")
        return value


class EnsembleParams(Section):
    """Which folds every model trains, and how the members' weights are fitted (stage `ensemble`)."""

    folds: list[int] = Field(
        default_factory=lambda: [0, 1, 2, 3, 4], description="folds every model trains (and predict averages)"
    )
    grid_step: float = Field(0.1, description="member weights on a simplex grid of this step, by OOF mIoU")
    per_class: bool = Field(False, description="true: one weight per (model, class), by coordinate ascent")
    tie_seeds: bool = Field(
        True, description="recipes differing only in train.seed share one weight, split equally among them"
    )
    calibrate: bool = Field(
        False, description="true: a probability scale per class, fitted on the OOF for mIoU (nested)"
    )
    postprocess: bool = Field(
        False,
        description="true: per class, drop small components (or all but the largest) where OOF says so",
    )

    @field_validator("grid_step")
    @classmethod
    def _step(cls, value: float) -> float:
        if not (0 < value <= 1 and abs(round(1 / value) * value - 1) < 1e-9):
            raise ValueError("1/n for an integer n")
        return value


class PredictParams(Section):
    """Test-time augmentation and fold ensembling (stages `oof` and `predict`)."""

    tta: Literal["auto", "none", "hflip", "vflip", "flips", "d4"] = Field(
        "auto", description="auto: the flips/rotations training used | none | hflip | vflip | flips | d4"
    )
    scales: list[float] = Field(default_factory=lambda: [1.0])
    batch_size: int = Field(8, ge=1)
    num_workers: int = Field(2, ge=0)
    sliding_window: bool = Field(
        False, description="overlap-tile inference in windows of augment.size (crop geometry)"
    )
    window_overlap: float = Field(0.5, ge=0, lt=1, description="fraction of the window")
    amp: bool = Field(True, description="CUDA only: bf16 (fp16 without bf16) autocast; false for float32")

    @field_validator("scales")
    @classmethod
    def _scales(cls, value: list[float]) -> list[float]:
        if not value or any(x <= 0 for x in value):
            raise ValueError("non-empty, all greater than 0")
        return value


class MetricParams(Section):
    """Which mIoU every score uses (validation, OOF, ensemble fitting, leaderboard, `score`)."""

    average: Literal["dataset", "image"] = Field(
        "dataset",
        description="dataset: one confusion matrix over all images | image: each image's mean IoU, averaged",
    )


class PseudoParams(Section):
    """Pseudo-labels of the test images from a frozen teacher (stage `pseudo`)."""

    enabled: bool = False
    threshold: float = _probability(0.9, "pixels the teacher is less sure of get the ignore index (255)")


class RefitParams(Section):
    """One more model per recipe trained on every training image, no validation (stages `refit`)."""

    enabled: bool = Field(False, description="true: train each recipe's refit model, and predict includes it")
    epochs: int | None = Field(
        None, ge=1, description="null: the median of the folds' best epochs (the upper middle one if even)"
    )
    # No OOF exists for a model that saw every image, so its share cannot be fitted: the user sets it.
    weight: float = Field(
        0.5,
        gt=0,
        le=1,
        description="its share of its recipe's probabilities in predict (folds: the rest)",
    )


class SubmissionParams(Section):
    """The submission CSV's format and mask size."""

    format: Literal["rle", "dense"] = Field("rle", description="rle | dense")
    size: int | None = Field(256, gt=0, description="null: each image's own size")
    rle_order: Literal["column", "row"] = "column"


class Recipe(Section):
    """One named model: the shared model/augment/train sections with its own overrides applied."""

    name: str
    model: ModelParams
    augment: AugmentParams
    train: TrainParams


class Params(Section):
    """All of params.yaml: the sections, then `models`, the named recipes resolved over the shared ones."""

    demo: DemoParams = Field(default_factory=DemoParams)
    data: DataParams = Field(default_factory=DataParams)
    split: SplitParams = Field(default_factory=SplitParams)
    augment: AugmentParams = Field(default_factory=AugmentParams)
    model: ModelParams = Field(default_factory=ModelParams)
    train: TrainParams = Field(default_factory=TrainParams)
    # The named recipes, each the shared model/augment/train sections with its own overrides.
    models: dict[str, Recipe] = Field(default_factory=dict)
    ensemble: EnsembleParams = Field(default_factory=EnsembleParams)
    runtime: RuntimeParams = Field(default_factory=RuntimeParams)
    predict: PredictParams = Field(default_factory=PredictParams)
    metric: MetricParams = Field(default_factory=MetricParams)
    pseudo: PseudoParams = Field(default_factory=PseudoParams)
    refit: RefitParams = Field(default_factory=RefitParams)
    submission: SubmissionParams = Field(default_factory=SubmissionParams)

    @model_validator(mode="after")
    def _across_sections(self) -> Params:
        """The rules no single section can check: folds against the split, recipes against pseudo-labels."""
        n, folds = self.split.n_splits, self.ensemble.folds
        bad = [k for k in folds if not 0 <= k < n]
        if bad:
            raise ValueError(
                f"'ensemble.folds' names fold {bad[0]}, but split.n_splits is {n} (folds 0..{n - 1})"
            )
        if not folds or len(set(folds)) != len(folds):
            raise ValueError(f"'ensemble.folds' must list each fold once, got {folds}")
        if len(self.models) > 1 and len(folds) < 2:
            # Each fold's weights are fitted on the other folds; with one fold there is nothing to fit on.
            raise ValueError(
                f"'ensemble.folds' needs at least 2 folds to fit the weights of {len(self.models)} models "
                f"honestly (cross-validated), got {folds}"
            )
        for recipe in self.models.values():
            # Rules of a model's input, not of augmentation code: unit tests build tiny AugmentParams.
            prefix, augment = f"models.{recipe.name}.", recipe.augment
            if augment.size % 32:
                raise ValueError(
                    f"'{prefix}augment.size' must be divisible by 32 (encoder strides), got {augment.size}"
                )
            if augment.elastic_p_min > augment.elastic_p_max:
                raise ValueError(
                    f"need 0 <= {prefix}augment.elastic_p_min <= {prefix}augment.elastic_p_max <= 1"
                )
        for recipe in self.models.values() if self.pseudo.enabled else ():
            prefix = f"models.{recipe.name}."
            if "ms_ssim" in recipe.train.losses:
                # A windowed structural score has no per-pixel term to leave out at the ignore index.
                raise ValueError(
                    f"'{prefix}train.losses' names ms_ssim, which cannot skip the ignored pixels of "
                    "pseudo-labels (pseudo.enabled); drop one of them"
                )
            if recipe.train.boundary_w0 > 0:
                raise ValueError(
                    f"'{prefix}train.boundary_w0' needs instance maps, which pseudo-labelled test images "
                    "do not have (pseudo.enabled); drop one of them"
                )
        return self

    def recipe(self, name: str) -> Recipe:
        """The recipe called `name`, or a UserError listing the names params.yaml defines."""
        try:
            return self.models[name]
        except KeyError:
            raise UserError(
                f"params: no model recipe '{name}' in 'models' (defined: {', '.join(self.models)})"
            ) from None


SECTIONS: dict[str, type[Section]] = {
    name: field.annotation  # type: ignore[misc]
    for name, field in Params.model_fields.items()
    if name != "models"
}
# A params file without `models` has no recipes to train; the defaults name one, "model", with no overrides.
DEFAULT_MODELS: dict[str, dict] = {"model": {}}


# ---------------------------------------------------------------------------------------------------------
# Complete params files: every key spelled out, written from an overlay of only what differs.


def defaults() -> dict[str, Any]:
    """Every section's defaults as a plain dict, plus the default `models`: the base of every overlay."""
    raw = {name: section().model_dump() for name, section in SECTIONS.items()}
    raw["models"] = copy.deepcopy(DEFAULT_MODELS)
    return raw


def complete(overlay: dict[str, Any]) -> dict[str, Any]:
    """`overlay` over the defaults: each section key by key, `models` replaced as a whole."""
    if not isinstance(overlay, dict):
        raise UserError(f"params: the top level must be a mapping, got {overlay!r}")
    raw = defaults()
    for name, values in overlay.items():
        if name in SECTIONS and isinstance(values, dict):
            raw[name] = {**raw[name], **copy.deepcopy(values)}
        elif name == "models":
            raw[name] = expand_seeds(copy.deepcopy(values))
        else:
            raw[name] = copy.deepcopy(values)  # a mistake that validation names
    return raw


def expand_seeds(models: Any) -> Any:
    """An overlay's recipes with `seeds: [a, b, ...]` written out as one recipe per seed, `<name>_s<seed>`,
    each with its `train.seed`: separate train stages (a DVC matrix needs every name in params.yaml),
    which the ensemble treats as members of one recipe (`ensemble.tie_seeds`). Anything else unchanged."""
    if not isinstance(models, dict):
        return models
    out: dict[str, Any] = {}
    for name, override in models.items():
        if not (isinstance(override, dict) and "seeds" in override):
            entries = {name: override}
        else:
            seeds = override["seeds"]
            valid = isinstance(seeds, list) and seeds and all(type(x) is int and x >= 0 for x in seeds)
            if not valid or len(set(seeds)) != len(seeds):
                raise UserError(
                    f"params: 'models.{name}.seeds' must list distinct seeds (integers >= 0), got {seeds!r}"
                )
            rest = {key: value for key, value in override.items() if key != "seeds"}
            entries = {
                f"{name}_s{seed}": {**rest, "train": {**(rest.get("train") or {}), "seed": seed}}
                for seed in seeds
            }
        for entry_name, entry in entries.items():
            if entry_name in out or (entry_name != name and entry_name in models):
                raise UserError(f"params: 'models' would hold two recipes named '{entry_name}' (seed copies)")
            out[entry_name] = entry
    return out


def overlay_of(raw: dict[str, Any]) -> dict[str, Any]:
    """What `raw` (a complete params dict) changes from the defaults: the inverse of `complete`."""
    base = defaults()
    diff = {}
    for name, values in raw.items():
        if name == "models":
            if values != base["models"]:
                diff[name] = values
            continue
        changed = {key: value for key, value in values.items() if base[name].get(key) != value}
        if changed:
            diff[name] = changed
    return diff


def missing_keys(raw: dict[str, Any]) -> list[str]:
    """The section keys a params dict leaves out (`models` is needed too; a recipe only overrides)."""
    missing = [name for name in [*SECTIONS, "models"] if name not in raw]
    for name, section in SECTIONS.items():
        values = raw.get(name)
        if isinstance(values, dict):
            missing += [f"{name}.{key}" for key in section.model_fields if key not in values]
    return missing


MODELS_NOTE = (
    "The named model recipes: each trains on every fold of ensemble.folds (stage train@<name>-<fold>) and\n"
    "the ensemble stage fits their weights on the out-of-fold predictions. An entry overrides any key of\n"
    "the shared model / augment / train sections; editing one re-runs only its own stages."
)


def render_params(raw: dict[str, Any], header: list[str]) -> str:
    """A complete params dict as params.yaml text: `header` comment lines, then each section under its
    docstring, one key a line with its field's description as a comment. yaml.safe_load reads back `raw`."""
    lines = [f"# {line}".rstrip() for line in header]
    for name in Params.model_fields:
        lines.append("")
        if name == "models":
            lines += [f"# {line}" for line in MODELS_NOTE.splitlines()]
            lines.append("models:")
            for recipe, override in raw["models"].items():
                if not override:
                    lines.append(f"  {recipe}: {{}}")
                    continue
                lines.append(f"  {recipe}:")
                lines += [f"    {section}: {_flow(values)}" for section, values in override.items()]
            continue
        section = SECTIONS[name]
        lines += [f"# {(section.__doc__ or '').splitlines()[0]}", f"{name}:"]
        for key, field in section.model_fields.items():
            text = f"  {key}: {_flow(raw[name][key])}"
            lines.append(f"{text:<34} # {field.description}" if field.description else text)
    return "\n".join(lines) + "\n"


def _flow(value: Any) -> str:
    """`value` as one line of YAML flow style."""
    text = yaml.safe_dump(value, default_flow_style=True, width=2**31, sort_keys=False)
    return text.removesuffix("\n...\n").strip()


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read a complete params file into `Params`; a missing key, an unknown key or a bad value raises."""
    path = Path(path)
    raw = read_yaml(path)
    return params_from_dict(raw or {}, source=str(path))


def load_overlay(path: str | Path) -> Params:
    """Read a params file that may be an overlay (configs/*.yaml), completed from the defaults: for
    benchmarks and commands that take a config; stages read the complete params.yaml with `load_params`."""
    path = Path(path)
    return params_from_dict(complete(read_yaml(path) or {}), source=str(path))


def read_yaml(path: Path) -> Any:
    """A YAML file's content, or a one-line UserError naming the file."""
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None


def params_from_dict(raw: dict[str, Any], source: str = "params") -> Params:
    """Build `Params` from a complete nested dict (see `complete`), checking every key and value, and
    resolve the model recipes."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: the top level must be a mapping, got {raw!r}")
    missing = missing_keys(raw)
    if missing:
        # A key left out would be filled by a code default that DVC does not track.
        raise UserError(
            f"{source}: missing key '{missing[0]}' ({len(missing)} missing; params files spell out every "
            "key: `python -m pipeline params OVERLAY` writes a complete one)"
        )
    shared = {key: value for key, value in raw.items() if key != "models"}
    unknown = sorted(set(shared) - set(SECTIONS))
    if unknown:
        raise UserError(
            f"{source}: unknown key '{unknown[0]}' "
            f"(valid keys here: {', '.join(sorted([*SECTIONS, 'models']))})"
        )
    sections = {name: _validate(SECTIONS[name], shared[name], source, name) for name in SECTIONS}
    models = _resolve_recipes(shared, raw["models"], source)
    try:
        return Params.model_validate({**sections, "models": models})
    except ValidationError as exc:
        raise _user_error(exc, Params, {}, source, "") from None


def params_from_overlay(overlay: dict[str, Any], source: str = "params") -> Params:
    """`params_from_dict(complete(overlay))`: params from only what differs from the defaults."""
    return params_from_dict(complete(overlay), source)


def params_to_dict(params: Params) -> dict[str, Any]:
    """The plain dict `params_from_dict` reads back as `params` (each recipe written out in full)."""
    raw = {name: getattr(params, name).model_dump() for name in SECTIONS}
    raw["models"] = {
        name: {section: getattr(recipe, section).model_dump() for section in RECIPE_SECTIONS}
        for name, recipe in params.models.items()
    }
    return raw


def _resolve_recipes(shared: dict[str, Any], overrides: Any, source: str) -> dict[str, Recipe]:
    """Each `models.<name>` entry merged over the shared model/augment/train sections, validated."""
    if not isinstance(overrides, dict) or not overrides:
        raise UserError(f"{source}: 'models' must map recipe names to their settings, got {overrides!r}")
    recipes = {}
    for name, override in overrides.items():
        if not isinstance(name, str) or not _RECIPE_NAME.fullmatch(name):
            raise UserError(f"{source}: model name {name!r} must be letters, digits and _ (it names stages)")
        override = {} if override is None else override
        prefix = f"models.{name}"
        if not isinstance(override, dict):
            raise UserError(f"{source}: '{prefix}' must be a mapping, got {override!r}")
        if "seeds" in override:
            raise UserError(
                f"{source}: '{prefix}.seeds' belongs in an overlay: `python -m pipeline params OVERLAY` "
                "writes one recipe per seed"
            )
        unknown = sorted(set(override) - set(RECIPE_SECTIONS))
        if unknown:
            raise UserError(
                f"{source}: unknown key '{prefix}.{unknown[0]}' "
                f"(valid keys here: {', '.join(RECIPE_SECTIONS)})"
            )
        sections = {}
        for section in RECIPE_SECTIONS:
            own = override.get(section) or {}
            if not isinstance(own, dict):
                raise UserError(f"{source}: '{prefix}.{section}' must be a mapping, got {own!r}")
            # The merged section is checked under the recipe's name: an error names models.<name>.<key>.
            sections[section] = _validate(
                SECTIONS[section], {**shared[section], **own}, source, f"{prefix}.{section}"
            )
        recipes[name] = Recipe(name=name, **sections)
    return recipes


def _validate(cls: type[Section], raw: Any, source: str, key: str) -> Section:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: '{key}' must be a mapping, got {raw!r}")
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise _user_error(exc, cls, raw, source, key) from None


# ---------------------------------------------------------------------------------------------------------
# One-line messages naming the key, from pydantic's errors.

_TYPE_NAMES = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    type(None): "null",
}


def _user_error(exc: ValidationError, cls: type[BaseModel], raw: dict, source: str, key: str) -> UserError:
    """The first error of `exc` (validating `raw` as `cls`, the section at `key`) as today's one line."""
    error = exc.errors()[0]
    loc = [part for part in error["loc"] if isinstance(part, str)]
    if not loc or (loc[0] not in cls.model_fields and error["type"] != "extra_forbidden"):
        # A model-level rule (a model validator's ValueError): its message names its keys.
        return UserError(f"{source}: {_reason(error)}")
    name = loc[0]
    where = f"{key}.{name}" if key else name
    if error["type"] == "extra_forbidden":
        return UserError(
            f"{source}: unknown key '{where}' (valid keys here: {', '.join(sorted(cls.model_fields))})"
        )
    field = cls.model_fields[name]
    value = raw.get(name)
    if error["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return UserError(f"{source}: '{where}' must be {_range(field)}, got {value!r}")
    if error["type"] == "value_error":
        return UserError(f"{source}: '{where}' must be {_reason(error)}, got {value!r}")
    return UserError(f"{source}: '{where}' must be {describe(field.annotation)}, got {value!r}")


def _reason(error: dict) -> str:
    cause = (error.get("ctx") or {}).get("error")
    return str(cause) if cause is not None else error["msg"]


def _range(field: FieldInfo) -> str:
    bounds = {
        kind: getattr(item, kind)
        for item in field.metadata
        for kind in ("gt", "ge", "lt", "le")
        if getattr(item, kind, None) is not None
    }
    low = ("ge", bounds["ge"]) if "ge" in bounds else ("gt", bounds["gt"]) if "gt" in bounds else None
    high = ("le", bounds["le"]) if "le" in bounds else ("lt", bounds["lt"]) if "lt" in bounds else None
    fmt = _number
    if low and high:
        if low[0] == "ge" and high[0] == "le":
            return f"between {fmt(low[1])} and {fmt(high[1])}"
        if low[0] == "gt" and high[0] == "lt":
            return f"between {fmt(low[1])} and {fmt(high[1])} (exclusive)"
        return f"at least {fmt(low[1])} and below {fmt(high[1])}"
    if low:
        return f"at least {fmt(low[1])}" if low[0] == "ge" else f"greater than {fmt(low[1])}"
    assert high is not None, "a range error on a field without bounds"
    return f"at most {fmt(high[1])}" if high[0] == "le" else f"below {fmt(high[1])}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def describe(annotation: Any) -> str:
    """A field's type in words, as messages say it: "an integer", "a list of a number", "a string or null"."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {describe(args[0])}"
    if origin is dict:
        return f"a mapping of {describe(args[0])} to {describe(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a mapping"
    return _TYPE_NAMES[annotation]
