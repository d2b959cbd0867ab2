"""Typed params: params.yaml loaded into frozen dataclasses, one per section, strictly checked."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import UserError


@dataclass(frozen=True)
class DemoParams:
    """The generated demo dataset (stage `demo`)."""

    seed: int = 0
    n_train: int = 300
    n_test: int = 80
    image_size: int = 512
    max_objects: int = 5
    jpeg_quality: int = 92


@dataclass(frozen=True)
class DataParams:
    """Where the COCO data is and how annotations become masks (stage `masks`)."""

    root: str = "data/demo"
    train_json: str = "data/demo/train.json"
    test_json: str = "data/demo/test.json"
    # dvc.yaml interpolates this into the leaderboard stage's deps, so it must be a path, never null: with
    # no test truth (the real competition) point it at test.json and the stage records "not scored".
    test_truth_json: str = "data/demo/test_truth.json"
    overlap: Literal["area_desc", "max_class"] = "area_desc"
    on_bad_annotation: Literal["error", "skip"] = "error"
    # Categories no training annotation uses (Roboflow's id-0 dataset category): keep them as classes, so
    # class indexes never shift, or drop them from the class list. The masks stage reports them either way.
    unused_categories: Literal["keep", "drop"] = "keep"


@dataclass(frozen=True)
class SplitParams:
    """Multi-label stratified K-fold (stage `split`)."""

    n_splits: int = 5
    seed: int = 42


@dataclass(frozen=True)
class AugmentParams:
    """Training augmentation, including rare-class-weighted elastic deformation."""

    size: int = 512  # training crops / squashed images are size x size (divisible by 32)
    # squash: resize every image to size x size (aspect ratio lost); crop: scale each image so its short
    # side is `short_side` (aspect kept), train on random size x size crops, predict on the whole image.
    resize: Literal["squash", "crop"] = "squash"
    short_side: int | None = None  # crop mode: null means `size`
    hflip: float = 0.5
    vflip: float = 0.0
    rot90: float = 0.0  # probability of a random multiple of 90 degrees (what lets d4 TTA help)
    shift_scale_rotate: float = 0.5
    color: float = 0.3
    elastic_p_min: float = 0.1
    elastic_p_max: float = 0.8
    elastic_gamma: float = 0.5
    elastic_alpha: float = 400.0
    elastic_sigma: float = 10.0
    elastic_impl: Literal["fast", "albumentations"] = "fast"
    oversample: bool = False
    # Rare-class copy-paste: with this probability a training image gets 1..copy_paste_max objects cut (by
    # their polygons) from the fold's other training images, the object drawn class first, a class with
    # probability proportional to its rarity weight (elastic_gamma), so rare classes are pasted most.
    copy_paste: float = 0.0  # 0: off
    copy_paste_max: int = 3
    copy_paste_scale: list[float] = field(default_factory=lambda: [0.75, 1.25])  # [low, high] size factor
    copy_paste_hflip: float = 0.5
    # anywhere: a uniform position; background: the position (of a few tries) covering the least foreground.
    copy_paste_placement: Literal["anywhere", "background"] = "background"


@dataclass(frozen=True)
class ModelParams:
    """The segmentation-models-pytorch model."""

    arch: str = "Unet"
    encoder: str = "resnet34"
    # null (random init), "imagenet" (downloaded by smp), or a path to a local state-dict file.
    encoder_weights: str | None = None
    decoder_channels: list[int] | None = None
    # A whole smp model saved with `save_pretrained` (a local folder, or a Hugging Face hub id fetched
    # once): arch and encoder then come from its config.json and its weights initialise the model.
    from_pretrained: str | None = None
    # Further keyword arguments of the architecture, checked against its signature: e.g.
    # {deep_supervision: true} for UnetPlusPlus or UNet3Plus, {cgm: true, cgm_gate: true} for UNet3Plus.
    options: dict[str, bool | int | float | str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainParams:
    """The training loop of one (model, fold): only settings that shape the trained weights."""

    epochs: int = 30
    batch_size: int = 8
    accumulate: int = 1
    lr: float = 3e-4
    # The encoder's lr (null: train.lr): a pretrained encoder often wants a smaller one than the decoder.
    encoder_lr: float | None = None
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    # After warmup: cosine decay to 0 over the run, or the base lr throughout.
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float | None = 1.0
    losses: dict[str, float] = field(default_factory=lambda: {"ce": 1.0, "dice": 1.0})
    class_weights: list[float] | None = None
    # Deep supervision (model.options.deep_supervision): the loss weight of each side output, deepest
    # last (null: 1.0 each); the classification-guided module's presence BCE weight (model.options.cgm).
    side_weights: list[float] | None = None
    presence_weight: float = 1.0
    # The U-Net paper's boundary weight map w(x) = w_c(x) + w0 * exp(-(d1 + d2)^2 / (2 sigma^2)) on the
    # per-pixel CE (0: off). d1, d2: distances (px, at the training size) to the nearest and second
    # nearest object; w_c: 1, or with class_balance each class's inverse pixel frequency in the image.
    boundary_w0: float = 0.0
    boundary_sigma: float = 5.0
    boundary_class_balance: bool = False
    amp: bool = True
    channels_last: bool = True
    # bf16 autocast and channels_last on a CPU that computes bf16 natively (AVX512-BF16 or AMX): about
    # 2x the training steps per minute there (bench/cpu_precision.py); float32 on any other CPU.
    cpu_bf16: bool = False
    compile: bool = False
    val_every: int = 1  # validate every N epochs (and always after the last)
    # Exponential moving average of the weights (decay per optimizer step, torch.optim.swa_utils), validated
    # and saved in best.pt instead of the raw weights; null: off.
    ema: float | None = None
    seed: int = 42
    max_batches: int | None = None


@dataclass(frozen=True)
class RuntimeParams:
    """How a train stage runs, not what it learns: changing these re-runs nothing and keeps resume state."""

    # Processes per node for DDP: above 1, stages/train.py starts that many workers under torchrun.
    nproc: int = 1
    num_workers: int = 4  # training and validation loader workers
    # Machines in one train stage's DDP run: above 1, `stages/train.py` runs once on each node (e.g. under
    # srun), and torchrun joins them at node 0's "host:port" (env TRASHSEG_RDZV_ENDPOINT overrides it).
    nnodes: int = 1
    rdzv_endpoint: str | None = None


@dataclass(frozen=True)
class EnsembleParams:
    """Which folds every model trains, and how the members' weights are fitted (stage `ensemble`)."""

    folds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    # Weights on a simplex grid of this step (0.1: 11 candidates for 2 models, 66 for 3), chosen by OOF mIoU.
    grid_step: float = 0.1
    # false: one weight per model; true: one per (model, class), by coordinate ascent from the former.
    per_class: bool = False


@dataclass(frozen=True)
class Recipe:
    """One named model: the shared model/augment/train sections with its own overrides applied."""

    name: str
    model: ModelParams
    augment: AugmentParams
    train: TrainParams


RECIPE_SECTIONS = ("model", "augment", "train")
_RECIPE_NAME = re.compile(r"[A-Za-z0-9_]+")
# host:port, the host a name, an IPv4 address or a bracketed IPv6 one ("[::1]:29500").
_ENDPOINT = re.compile(r"([^\s:\[\]]+|\[[0-9A-Fa-f:.]+\]):([0-9]+)")


@dataclass(frozen=True)
class PredictParams:
    """Test-time augmentation and fold ensembling (stage `predict`)."""

    # auto: the symmetries the model was trained with (augment.hflip / vflip / rot90 > 0); naming one the
    # model never saw in training is refused (see infer.resolve_tta).
    tta: Literal["auto", "none", "hflip", "vflip", "flips", "d4"] = "auto"
    scales: list[float] = field(default_factory=lambda: [1.0])
    batch_size: int = 8
    num_workers: int = 2
    # Overlap-tile inference: windows of the training size (augment.size) with this overlap (a fraction
    # of the window), blended with a smooth window; for images larger than the training size.
    sliding_window: bool = False
    window_overlap: float = 0.5
    # Mixed precision on CUDA (bf16, or fp16 where the GPU lacks bf16, e.g. a T4); false: float32.
    amp: bool = True


@dataclass(frozen=True)
class MetricParams:
    """Which mIoU every score uses: validation, out-of-fold, ensemble fitting, leaderboard, `score`."""

    # dataset: one confusion matrix summed over every image, IoU per class, mean over classes present.
    # image: per image, the mean IoU over the classes in its truth or its prediction; then the mean of those.
    average: Literal["dataset", "image"] = "dataset"


@dataclass(frozen=True)
class PseudoParams:
    """Pseudo-labels of the test images from a frozen teacher's ensemble probabilities (stage `pseudo`)."""

    enabled: bool = False
    # Pixels whose teacher probability (of its argmax class) is below this get the ignore index: no loss.
    threshold: float = 0.9


@dataclass(frozen=True)
class SubmissionParams:
    """The submission CSV's format and mask size."""

    format: Literal["rle", "dense"] = "rle"
    size: int | None = 256
    rle_order: Literal["column", "row"] = "column"


@dataclass(frozen=True)
class Params:
    """All of params.yaml."""

    demo: DemoParams = field(default_factory=DemoParams)
    data: DataParams = field(default_factory=DataParams)
    split: SplitParams = field(default_factory=SplitParams)
    # Shared defaults of every model recipe (params.yaml's `models` overrides them per model).
    augment: AugmentParams = field(default_factory=AugmentParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    runtime: RuntimeParams = field(default_factory=RuntimeParams)
    ensemble: EnsembleParams = field(default_factory=EnsembleParams)
    predict: PredictParams = field(default_factory=PredictParams)
    submission: SubmissionParams = field(default_factory=SubmissionParams)
    metric: MetricParams = field(default_factory=MetricParams)
    pseudo: PseudoParams = field(default_factory=PseudoParams)
    # The named model recipes, resolved; params.yaml without a `models` section has one, "model".
    models: dict[str, Recipe] = field(default_factory=dict)

    def recipe(self, name: str) -> Recipe:
        """The recipe called `name`, or a UserError listing the names params.yaml defines."""
        try:
            return self.models[name]
        except KeyError:
            raise UserError(
                f"params: no model recipe '{name}' in 'models' (defined: {', '.join(self.models)})"
            ) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read `path` into `Params`; a missing section takes its defaults, an unknown key or bad type raises."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return params_from_dict(raw or {}, source=str(path))


def params_from_dict(raw: dict[str, Any], source: str = "params") -> Params:
    """Build `Params` from a nested dict, checking every key and type, and resolve the model recipes."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: the top level must be a mapping, got {raw!r}")
    overrides = raw.get("models", {"model": {}})
    shared = {key: value for key, value in raw.items() if key != "models"}
    params = _build(Params, shared, source, prefix="")
    params = dataclasses.replace(params, models=_resolve_recipes(shared, overrides, source))
    _check_consistency(params, source)
    return params


def params_to_dict(params: Params) -> dict[str, Any]:
    """The plain dict `params_from_dict` reads back as `params` (each recipe written out in full)."""
    raw = {
        f.name: dataclasses.asdict(getattr(params, f.name))
        for f in dataclasses.fields(params)
        if f.name != "models"
    }
    raw["models"] = {
        name: {section: dataclasses.asdict(getattr(recipe, section)) for section in RECIPE_SECTIONS}
        for name, recipe in params.models.items()
    }
    return raw


def _resolve_recipes(shared: dict[str, Any], overrides: Any, source: str) -> dict[str, Recipe]:
    """Each `models.<name>` entry merged over the shared model/augment/train sections, type-checked."""
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
        unknown = sorted(set(override) - set(RECIPE_SECTIONS))
        if unknown:
            raise UserError(
                f"{source}: unknown key '{prefix}.{unknown[0]}' "
                f"(valid keys here: {', '.join(RECIPE_SECTIONS)})"
            )
        hints = typing.get_type_hints(Recipe)
        sections = {}
        for section in RECIPE_SECTIONS:
            base, own = shared.get(section) or {}, override.get(section) or {}
            for key, what in ((section, base), (f"{prefix}.{section}", own)):
                if not isinstance(what, dict):
                    raise UserError(f"{source}: '{key}' must be a mapping, got {what!r}")
            # Shared keys were checked already; an error here names the recipe's own key.
            _build(hints[section], own, source, prefix=f"{prefix}.{section}.")
            sections[section] = _build(hints[section], {**base, **own}, source, prefix=f"{section}.")
        recipes[name] = Recipe(name=name, **sections)
    return recipes


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise UserError(
            f"{source}: unknown key '{prefix}{unknown[0]}' (valid keys here: {', '.join(sorted(names))})"
        )
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, source, prefix=f"{key}.")
        else:
            values[name] = _check(value, hint, key, source)
    return cls(**values)


def _check(value: Any, hint: Any, key: str, source: str) -> Any:
    """Return `value` if it matches the annotation `hint` (ints are accepted where floats are expected)."""
    if _matches(value, hint):
        if hint is float:
            return float(value)
        return value
    raise UserError(f"{source}: '{key}' must be {_describe(hint)}, got {value!r}")


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items()
        )
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    raise TypeError(f"unsupported annotation {hint!r}")  # a bug in this module, not user input


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is dict:
        return f"a mapping of {_describe(args[0])} to {_describe(args[1])}"
    if hint is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[hint]


# Ranges a type cannot express, checked on every value that is not null: key -> (rule, what it must be).
# (The demo section is checked by `demo.generate_demo`, which benchmarks also call directly.)
Rule = tuple[Callable[[Any], bool], str]
_AT_LEAST_1: Rule = (lambda v: v >= 1, "at least 1")
_AT_LEAST_0: Rule = (lambda v: v >= 0, "at least 0")
_POSITIVE: Rule = (lambda v: v > 0, "greater than 0")
_PROBABILITY: Rule = (lambda v: 0 <= v <= 1, "between 0 and 1")
_WEIGHTS: Rule = (lambda v: all(w >= 0 for w in v) and any(w > 0 for w in v), "all >= 0, some > 0")
_RANGES: dict[str, Rule] = {
    "augment.size": _POSITIVE,
    "augment.hflip": _PROBABILITY,
    "augment.vflip": _PROBABILITY,
    "augment.rot90": _PROBABILITY,
    "augment.short_side": _POSITIVE,
    "augment.shift_scale_rotate": _PROBABILITY,
    "augment.color": _PROBABILITY,
    "augment.elastic_gamma": _AT_LEAST_0,
    "augment.elastic_alpha": _AT_LEAST_0,
    "augment.elastic_sigma": _POSITIVE,
    "augment.copy_paste": _PROBABILITY,
    "augment.copy_paste_max": _AT_LEAST_1,
    "augment.copy_paste_scale": (
        lambda v: len(v) == 2 and 0 < v[0] <= v[1],
        "[low, high] with 0 < low <= high",
    ),
    "augment.copy_paste_hflip": _PROBABILITY,
    "model.decoder_channels": (lambda v: len(v) > 0 and all(c >= 1 for c in v), "non-empty, all at least 1"),
    "split.seed": _AT_LEAST_0,
    "train.seed": _AT_LEAST_0,  # numpy's SeedSequence takes no negative entropy
    "train.epochs": _AT_LEAST_1,
    "train.batch_size": _AT_LEAST_1,
    "train.accumulate": _AT_LEAST_1,
    "train.lr": _POSITIVE,
    "train.encoder_lr": _POSITIVE,
    "train.weight_decay": _AT_LEAST_0,
    "train.warmup_epochs": _AT_LEAST_0,
    "train.grad_clip": _POSITIVE,
    "train.losses": (lambda v: _WEIGHTS[0](list(v.values())), "weights all >= 0, some > 0"),
    "train.class_weights": _WEIGHTS,
    "train.side_weights": (lambda v: all(w >= 0 for w in v), "all >= 0"),
    "train.presence_weight": _AT_LEAST_0,
    "train.boundary_w0": _AT_LEAST_0,
    "train.boundary_sigma": _POSITIVE,
    "train.val_every": _AT_LEAST_1,
    "train.max_batches": _AT_LEAST_1,
    "train.ema": (lambda v: 0 < v < 1, "between 0 and 1 (exclusive)"),
    "pseudo.threshold": _PROBABILITY,
    "runtime.nproc": _AT_LEAST_1,
    "runtime.num_workers": _AT_LEAST_0,
    "runtime.nnodes": _AT_LEAST_1,
    "runtime.rdzv_endpoint": (lambda v: split_endpoint(v) is not None, "host:port of node 0 (port 1-65535)"),
    "ensemble.grid_step": (lambda v: 0 < v <= 1 and abs(round(1 / v) * v - 1) < 1e-9, "1/n for an integer n"),
    "predict.scales": (lambda v: len(v) > 0 and all(x > 0 for x in v), "non-empty, all greater than 0"),
    "predict.batch_size": _AT_LEAST_1,
    "predict.num_workers": _AT_LEAST_0,
    "predict.window_overlap": (lambda v: 0 <= v < 1, "at least 0 and below 1"),
    "submission.size": _POSITIVE,
}


def split_endpoint(value: str) -> tuple[str, int] | None:
    """Split "host:port" into (host, port); None if `value` has another shape or a port outside 1-65535."""
    match = _ENDPOINT.fullmatch(value)
    if match is None or not 0 < int(match[2]) < 2**16:
        return None
    return match[1], int(match[2])


def _check_ranges(sections: Any, source: str, prefix: str = "") -> None:
    """Check the _RANGES of each section `sections` has (Params, or a Recipe with prefix models.<name>.)."""
    for key, (rule, what) in _RANGES.items():
        section, name = key.split(".")
        if not hasattr(sections, section):
            continue
        value = getattr(getattr(sections, section), name)
        if value is not None and not rule(value):
            raise UserError(f"{source}: '{prefix}{key}' must be {what}, got {value!r}")


def _check_pseudo(recipe: Recipe, source: str, prefix: str) -> None:
    """What pseudo-labelled images cannot feed: a loss without ignored pixels, a map needing instances."""
    if "ms_ssim" in recipe.train.losses:
        # A windowed structural score has no per-pixel term to leave out at the ignore index.
        raise UserError(
            f"{source}: '{prefix}train.losses' names ms_ssim, which cannot skip the ignored pixels of "
            "pseudo-labels (pseudo.enabled); drop one of them"
        )
    if recipe.train.boundary_w0 > 0:
        raise UserError(
            f"{source}: '{prefix}train.boundary_w0' needs instance maps, which pseudo-labelled test images "
            "do not have (pseudo.enabled); drop one of them"
        )


def _check_consistency(params: Params, source: str) -> None:
    """Ranges, and cross-section rules that a single type cannot express."""
    _check_ranges(params, source)
    n = params.split.n_splits
    if n < 2:
        raise UserError(f"{source}: 'split.n_splits' must be at least 2, got {n}")
    folds = params.ensemble.folds
    bad = [k for k in folds if not 0 <= k < n]
    if bad:
        raise UserError(
            f"{source}: 'ensemble.folds' names fold {bad[0]}, but split.n_splits is {n} (folds 0..{n - 1})"
        )
    if not folds or len(set(folds)) != len(folds):
        raise UserError(f"{source}: 'ensemble.folds' must list each fold once, got {folds}")
    if len(params.models) > 1 and len(folds) < 2:
        # Each fold's weights are fitted on the other folds; with one fold there is nothing to fit on.
        raise UserError(
            f"{source}: 'ensemble.folds' needs at least 2 folds to fit the weights of "
            f"{len(params.models)} models honestly (cross-validated), got {folds}"
        )
    for recipe in params.models.values():
        prefix = f"models.{recipe.name}."
        _check_ranges(recipe, source, prefix)
        if params.pseudo.enabled:
            _check_pseudo(recipe, source, prefix)
        if recipe.augment.size % 32:
            raise UserError(
                f"{source}: '{prefix}augment.size' must be divisible by 32 (encoder strides), "
                f"got {recipe.augment.size}"
            )
        if not 0 <= recipe.augment.elastic_p_min <= recipe.augment.elastic_p_max <= 1:
            raise UserError(
                f"{source}: need 0 <= {prefix}augment.elastic_p_min <= {prefix}augment.elastic_p_max <= 1"
            )
