"""trashseg's architectures beyond smp's: U-Net 3+ and U-Net++ with deep supervision."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base import SegmentationHead, SegmentationModel
from segmentation_models_pytorch.base import initialization as init
from segmentation_models_pytorch.base import modules as md
from segmentation_models_pytorch.base.hub_mixin import supports_config_loading
from segmentation_models_pytorch.base.utils import is_torch_compiling
from segmentation_models_pytorch.decoders.unetplusplus.decoder import UnetPlusPlusDecoder
from segmentation_models_pytorch.encoders import get_encoder
from torch import nn

# The logit an absent class gets from the CGM gate: far below any trained logit, and representable in
# fp16 (max 65504) and bf16, so the gate is safe under autocast.
ABSENT_LOGIT = -1e4
# Dropout before the presence head's 1x1 conv, as in the U-Net 3+ paper's classification-guided module.
_CGM_DROPOUT = 0.5

# What a model with deep supervision or a CGM returns in train mode (see UNet3Plus).
Output = torch.Tensor | dict[str, Any]


class UNet3Plus(SegmentationModel):
    """U-Net 3+ (Huang et al., ICASSP 2020) on any smp encoder, `tu-` timm encoders included.

    Full-scale skip connections: the decoder map at each encoder stride 2 .. 2**(depth-1) fuses the
    same-scale encoder map, every shallower encoder map (max-pooled down) and every deeper decoder map
    plus the deepest encoder map (bilinearly upsampled), each through a 3x3 conv + BN + ReLU to
    `cat_channels`, then a 3x3 conv + BN + ReLU over their concatenation (`cat_channels` x the number of
    scales wide). The deepest "decoder map" is the deepest encoder map itself, as in the paper. The
    logits come from a 3x3 conv on the stride-2 decoder map, bilinearly upsampled x2 to the input size
    (smp encoders have no stride-1 stage to fuse; convolving before upsampling keeps the head cheap).

    Args:
        encoder_name, encoder_depth, encoder_weights, in_channels, classes: as in smp's models
            (encoder_depth 2 to 5; height and width must be divisible by 2**encoder_depth).
        cat_channels: width of each full-scale branch (the paper's 64).
        deep_supervision: add a side output (3x3 conv to `classes`, upsampled to the input size) on
            every decoder map but the shallowest (that one is the main output) and on the deepest
            encoder map: `n_side_outputs` = encoder_depth - 1.
        cgm: add the classification-guided module: a presence head on the deepest encoder map
            (dropout, 1x1 conv to `classes`, global max pool) giving (N, classes) logits of "class c is
            in the image", trained with BCE through the loss.
        cgm_gate: in eval mode, set the logits of every foreground class (index >= 1) the presence
            head finds absent (sigmoid < 0.5) to ABSENT_LOGIT; background (index 0) is never gated.
            Training outputs are never gated. Needs cgm.

    Output: in eval mode, or in train mode with neither deep_supervision nor cgm, the logits
    (N, classes, H, W). In train mode with either: {"logits": (N, classes, H, W), "side": the side
    outputs' logits, each (N, classes, H, W), shallow to deep ([] without deep_supervision),
    "presence": (N, classes) logits (only with cgm)}.
    """

    _is_torch_scriptable = False  # dict outputs and Python-side branching on the settings

    @supports_config_loading
    def __init__(
        self,
        encoder_name: str = "resnet34",
        encoder_depth: int = 5,
        encoder_weights: str | None = None,
        in_channels: int = 3,
        classes: int = 1,
        cat_channels: int = 64,
        deep_supervision: bool = False,
        cgm: bool = False,
        cgm_gate: bool = False,
    ) -> None:
        super().__init__()
        # The full-scale decoder needs at least one stage below the deepest encoder map.
        if not 2 <= encoder_depth <= 5:
            raise ValueError(f"UNet3Plus takes encoder_depth 2 to 5, got {encoder_depth}")
        if cat_channels < 1:
            raise ValueError(f"cat_channels must be at least 1, got {cat_channels}")
        if cgm_gate and not cgm:
            raise ValueError("cgm_gate needs cgm: the gate reads the presence head's logits")
        self.encoder = get_encoder(
            encoder_name, in_channels=in_channels, depth=encoder_depth, weights=encoder_weights
        )
        self.decoder = UNet3PlusDecoder(self.encoder.out_channels, cat_channels)
        widths = self.decoder.out_channels
        self.segmentation_head = SegmentationHead(widths[0], classes, kernel_size=3)
        # One head per decoder map but the shallowest, and one on the deepest encoder map.
        self.side_heads = (
            nn.ModuleList(SegmentationHead(width, classes, kernel_size=3) for width in widths[1:])
            if deep_supervision
            else None
        )
        self.presence_head = (
            nn.Sequential(
                nn.Dropout(_CGM_DROPOUT),
                nn.Conv2d(self.encoder.out_channels[-1], classes, kernel_size=1),
                nn.AdaptiveMaxPool2d(1),
                nn.Flatten(),
            )
            if cgm
            else None
        )
        self.classification_head = None  # smp's aux_params head: not offered (the CGM is ours)
        self.cgm_gate = cgm_gate
        self.n_side_outputs = len(self.side_heads) if self.side_heads is not None else 0
        self.name = f"unet3plus-{encoder_name}"
        self.initialize()

    def initialize(self) -> None:
        init.initialize_decoder(self.decoder)
        for head in (self.segmentation_head, self.side_heads, self.presence_head):
            if head is not None:
                init.initialize_head(head)

    def forward(self, x: torch.Tensor) -> Output:
        if not (torch.jit.is_scripting() or torch.jit.is_tracing() or is_torch_compiling()):
            self.check_input_shape(x)
        features = self.encoder(x)
        maps = self.decoder(features)
        size = x.shape[-2:]
        logits = _resize(self.segmentation_head(maps[0]), size)
        if not self.training:
            if self.cgm_gate:
                logits = gate_absent_classes(logits, self.presence_head(features[-1]))
            return logits
        if self.side_heads is None and self.presence_head is None:
            return logits
        side = []
        if self.side_heads is not None:
            side = [_resize(head(m), size) for head, m in zip(self.side_heads, maps[1:], strict=True)]
        out: dict[str, Any] = {"logits": logits, "side": side}
        if self.presence_head is not None:
            out["presence"] = self.presence_head(features[-1])
        return out


class UNet3PlusDecoder(nn.Module):
    """The full-scale decoder: from the encoder's features (strides 1 .. 2**depth) to one map per stride
    2 .. 2**depth, shallow first; the last is the deepest encoder map itself.

    `out_channels` holds those maps' widths.
    """

    def __init__(self, encoder_channels: Sequence[int], cat_channels: int) -> None:
        super().__init__()
        channels = list(encoder_channels[1:])  # the stride-1 "feature" is the input image
        depth = len(channels)
        widths = [0] * (depth - 1) + [channels[-1]]
        stages: list[FullScaleStage] = []
        # Deep to shallow: each stage takes the widths of the deeper maps it fuses.
        for scale in reversed(range(depth - 1)):
            stage = FullScaleStage(channels[: scale + 1], widths[scale + 1 :], cat_channels)
            widths[scale] = stage.out_channels
            stages.insert(0, stage)
        self.stages = nn.ModuleList(stages)  # stages[i]: the map at stride 2**(i + 1)
        self.out_channels = widths

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        encoder = features[1:]
        maps: list[torch.Tensor] = [encoder[-1]]
        # Deep to shallow, each stage fusing the maps below it (kept shallow first, as its branches are).
        for scale in reversed(range(len(self.stages))):
            maps.insert(0, self.stages[scale](encoder[: scale + 1], maps))
        return maps


class FullScaleStage(nn.Module):
    """One U-Net 3+ decoder stage: the same-scale and shallower encoder maps (max-pooled down) and the
    deeper maps (bilinearly upsampled), each through a 3x3 conv + BN + ReLU to `cat_channels`, fused by
    a 3x3 conv + BN + ReLU over their concatenation."""

    def __init__(
        self, encoder_channels: Sequence[int], deeper_channels: Sequence[int], cat_channels: int
    ) -> None:
        super().__init__()
        scale = len(encoder_channels) - 1
        # timm's transformer-style encoders give an empty (0-channel) stride-2 map: nothing to fuse.
        self.encoder_inputs = [j for j, width in enumerate(encoder_channels) if width > 0]
        self.shallower = nn.ModuleList(
            nn.Sequential(
                _max_pool(2 ** (scale - j)),
                md.Conv2dReLU(encoder_channels[j], cat_channels, kernel_size=3, padding=1),
            )
            for j in self.encoder_inputs
        )
        self.deeper = nn.ModuleList(
            md.Conv2dReLU(width, cat_channels, kernel_size=3, padding=1) for width in deeper_channels
        )
        self.out_channels = cat_channels * (len(self.shallower) + len(self.deeper))
        self.fuse = md.Conv2dReLU(self.out_channels, self.out_channels, kernel_size=3, padding=1)

    def forward(self, encoder: list[torch.Tensor], deeper: list[torch.Tensor]) -> torch.Tensor:
        size = encoder[-1].shape[-2:]  # this stage's scale (an empty map still has its size)
        parts = [branch(encoder[j]) for branch, j in zip(self.shallower, self.encoder_inputs, strict=True)]
        parts += [branch(_resize(m, size)) for branch, m in zip(self.deeper, deeper, strict=True)]
        return self.fuse(torch.cat(parts, dim=1))


class UnetPlusPlus(smp.UnetPlusPlus):
    """smp's U-Net++ with the U-Net++ paper's deep supervision (`deep_supervision=True`).

    The side outputs are the intermediate top-row nested nodes X^{0,1} .. X^{0,depth-2} (paper notation;
    they sit at stride 2, X^{0,depth-1} feeds smp's final block and head), each through its own 3x3
    segmentation head to `classes` and bilinearly upsampled to the input size: `n_side_outputs` =
    encoder_depth - 2, ordered from the shallowest nested U-Net to the deepest.

    Output: in eval mode, or without deep_supervision, smp's (the logits (N, classes, H, W)). In train
    mode with deep_supervision: {"logits": (N, classes, H, W), "side": [(N, classes, H, W), ...]}.
    Without deep_supervision the parameters (and state_dict keys) are smp.UnetPlusPlus's, so checkpoints
    of either load into the other. The other arguments are smp.UnetPlusPlus's.
    """

    @supports_config_loading
    def __init__(
        self,
        encoder_name: str = "resnet34",
        encoder_depth: int = 5,
        encoder_weights: str | None = "imagenet",
        decoder_use_norm: bool | str | dict[str, Any] = "batchnorm",
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        decoder_attention_type: str | None = None,
        decoder_interpolation: str = "nearest",
        in_channels: int = 3,
        classes: int = 1,
        activation: str | Callable | None = None,
        aux_params: dict | None = None,
        deep_supervision: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            encoder_name=encoder_name,
            encoder_depth=encoder_depth,
            encoder_weights=encoder_weights,
            decoder_use_norm=decoder_use_norm,
            decoder_channels=decoder_channels,
            decoder_attention_type=decoder_attention_type,
            decoder_interpolation=decoder_interpolation,
            in_channels=in_channels,
            classes=classes,
            activation=activation,
            aux_params=aux_params,
            **kwargs,
        )
        self.side_heads = None
        if deep_supervision:
            if aux_params is not None:
                raise ValueError("deep_supervision does not combine with aux_params")
            decoder = self.decoder
            # Every X^{0,j} node's width: the stride-2 encoder map's (smp's skip_channels, reversed).
            width = decoder.skip_channels[decoder.depth - 1]
            if width == 0:
                raise ValueError(f"deep_supervision needs a stride-2 feature map, which {encoder_name} lacks")
            self.side_heads = nn.ModuleList(
                SegmentationHead(width, classes, kernel_size=3) for _ in range(decoder.depth - 1)
            )
            init.initialize_head(self.side_heads)
        self.n_side_outputs = len(self.side_heads) if self.side_heads is not None else 0

    def forward(self, x: torch.Tensor) -> Output:
        if not self.training or self.side_heads is None:
            return super().forward(x)
        if not (torch.jit.is_scripting() or torch.jit.is_tracing() or is_torch_compiling()):
            self.check_input_shape(x)
        nodes = nested_nodes(self.decoder, self.encoder(x))
        depth = self.decoder.depth
        logits = self.segmentation_head(nodes[f"x_0_{depth}"])
        # smp's x_{d}_{depth-1} is the paper's X^{0, depth-1-d}: shallowest nested U-Net first.
        side_nodes = [nodes[f"x_{d}_{depth - 1}"] for d in range(depth - 1, 0, -1)]
        size = x.shape[-2:]
        side = [_resize(head(node), size) for head, node in zip(self.side_heads, side_nodes, strict=True)]
        return {"logits": logits, "side": side}


def nested_nodes(decoder: UnetPlusPlusDecoder, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every node of smp 0.6's UnetPlusPlusDecoder ("x_{depth_idx}_{layer_idx}"), computed as its
    `forward` does (which returns only the last, "x_0_{depth}")."""
    features = features[1:][::-1]  # drop the stride-1 input, deepest first
    dense_x: dict[str, torch.Tensor] = {}
    for layer_idx in range(len(decoder.in_channels) - 1):
        for depth_idx in range(decoder.depth - layer_idx):
            if layer_idx == 0:
                output = decoder.blocks[f"x_{depth_idx}_{depth_idx}"](
                    features[depth_idx], features[depth_idx + 1]
                )
                dense_x[f"x_{depth_idx}_{depth_idx}"] = output
            else:
                dense_l_i = depth_idx + layer_idx
                cat_features = [
                    dense_x[f"x_{idx}_{dense_l_i}"] for idx in range(depth_idx + 1, dense_l_i + 1)
                ]
                cat_features = torch.cat([*cat_features, features[dense_l_i + 1]], dim=1)
                dense_x[f"x_{depth_idx}_{dense_l_i}"] = decoder.blocks[f"x_{depth_idx}_{dense_l_i}"](
                    dense_x[f"x_{depth_idx}_{dense_l_i - 1}"], cat_features
                )
    dense_x[f"x_0_{decoder.depth}"] = decoder.blocks[f"x_0_{decoder.depth}"](
        dense_x[f"x_0_{decoder.depth - 1}"]
    )
    return dense_x


def gate_absent_classes(logits: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """`logits` (N, C, H, W) with each foreground class (index >= 1) whose presence logit (N, C) is
    below 0 (sigmoid < 0.5) set to ABSENT_LOGIT; background (index 0) is left alone."""
    foreground = torch.arange(presence.shape[1], device=presence.device) >= 1
    absent = (presence < 0) & foreground
    return logits.masked_fill(absent[:, :, None, None], ABSENT_LOGIT)


def _max_pool(factor: int) -> nn.Module:
    return nn.MaxPool2d(factor, factor, ceil_mode=True) if factor > 1 else nn.Identity()


def _resize(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    if x.shape[-2:] == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
