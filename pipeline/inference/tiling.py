"""Sliding-window (overlap-tile) inference: a model run on training-sized tiles of a larger image, blended.

Layout along each axis, for a tile of T pixels and `overlap` (a fraction of T):

- stride s = max(1, round(T * (1 - overlap))); overlap in pixels o = T - s.
- A side longer than T is reflect-padded by a margin m = o // 2 on both ends, then covered by tiles at
  0, s, 2s, ... with the last one moved back to end at the padded border. Inside the image every pixel
  lies at least about o / 2 inside some tile; the margin extends that guarantee to the border pixels,
  with mirrored context (as in the U-Net paper) instead of a tile edge.
- A side no longer than T is not tiled: it is reflect-padded (centred, the odd pixel after) up to exactly
  T, so the model always sees T x T inputs, the shape it was trained on, whatever the image's size. An
  image with both sides <= T is one pass of the wrapped module on that padded image, cropped back: no
  blending, so an image of exactly T x T (squash geometry at scale 1) gives bit-identical output.
  Reflection needs a pad smaller than the side, so tiny sides are mirrored in several passes, and a
  side of one pixel is replicated.

Blending: each tile's probabilities are weighted by a separable window (`blend_window`) and the weighted
sums are divided by the summed weights, so a constant prediction stays exactly constant (no seams). The
window is a Hann bump over the tile's core, with a tiny positive floor over a band of o // 4 pixels at
each tile edge: predictions made next to a cut-off tile edge, where the model lacked context, count only
where no tile covers the pixel with its core (the tiling guarantees one does, inside the image).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import UserError

# The weight of a tile's edge band (and the floor of its core): positive, so every pixel has weight > 0,
# but small enough that edge-band predictions change a blended probability by ~1e-6 where a core exists.
WINDOW_FLOOR = 1e-6


def tile_stride(tile: int, overlap: float) -> int:
    """Pixels between consecutive tile origins: round(tile * (1 - overlap)), at least 1."""
    if tile < 1:
        raise UserError(f"sliding window: the tile size must be at least 1 pixel, got {tile}")
    if not 0 <= overlap < 1:
        raise UserError(f"predict.window_overlap must be at least 0 and below 1, got {overlap}")
    return max(1, round(tile * (1 - overlap)))


def tile_origins(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of the tiles covering a side of `length` >= `tile` pixels: 0, stride, 2 * stride, ...
    while a tile would end before the border, then one tile ending exactly at the border."""
    if length < tile:
        raise ValueError(f"a side of {length} pixels cannot hold a tile of {tile}")
    return [*range(0, length - tile, stride), length - tile]


def axis_padding(length: int, tile: int, margin: int) -> tuple[int, int]:
    """(before, after) padding of a side: `margin` each end when it is longer than the tile, else up to
    exactly the tile, centred (the odd pixel after)."""
    if length > tile:
        return margin, margin
    before = (tile - length) // 2
    return before, tile - length - before


def blend_window(tile: int, band: int, floor: float = WINDOW_FLOOR) -> torch.Tensor:
    """float32 (tile,) weights: `floor` over `band` pixels at each end, and over the core between them
    floor + (1 - floor) * sin^2(pi (i + 0.5) / core_length), a Hann bump, positive at every pixel."""
    core = tile - 2 * band
    if band < 0 or core < 1:
        raise ValueError(f"a band of {band} pixels leaves no core in a tile of {tile}")
    weights = torch.full((tile,), floor, dtype=torch.float64)
    position = torch.arange(core, dtype=torch.float64) + 0.5
    weights[band : tile - band] = floor + (1 - floor) * torch.sin(math.pi * position / core) ** 2
    return weights.float()


def reflect_pad(images: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Mirror-pad (B, C, H, W) images; a pad at least as long as the side (which one reflection cannot
    fill) is done in several reflections, and a side of a single pixel is replicated."""
    return _pad_axis(_pad_axis(images, left, right, axis=-1), top, bottom, axis=-2)


def _pad_axis(images: torch.Tensor, before: int, after: int, axis: int) -> torch.Tensor:
    """Pad the last (axis -1) or second last (axis -2) dimension by reflection, in several passes if
    needed; a dimension of one pixel, which has no mirror image, is replicated."""

    def pads(a: int, b: int) -> tuple[int, int, int, int]:
        return (a, b, 0, 0) if axis == -1 else (0, 0, a, b)  # F.pad's order: last dimension first

    while before or after:
        limit = images.shape[axis] - 1  # a reflection pads less than the side
        if limit == 0:
            return F.pad(images, pads(before, after), mode="replicate")
        step_before, step_after = min(before, limit), min(after, limit)
        images = F.pad(images, pads(step_before, step_after), mode="reflect")
        before, after = before - step_before, after - step_after
    return images


class SlidingWindow(nn.Module):
    """Runs `module` on `tile` x `tile` tiles of each image and blends their outputs (module docstring).

    module: maps (N, 3, tile, tile) normalised images to (N, C, tile, tile) probabilities (e.g. a ttach
    wrapper around `SoftmaxOutput`, so TTA runs per tile). `tile_batch`: tiles per call of `module`,
    which bounds memory whatever the image size.
    """

    def __init__(self, module: nn.Module, tile: int, overlap: float, tile_batch: int = 8) -> None:
        super().__init__()
        if tile_batch < 1:
            raise ValueError(f"tile_batch must be at least 1, got {tile_batch}")
        self.module = module
        self.tile = tile
        self.stride = tile_stride(tile, overlap)
        overlap_px = tile - self.stride
        self.margin = overlap_px // 2
        self.tile_batch = tile_batch
        # Non-persistent: derived from the arguments, not state worth saving with a model.
        self.register_buffer("window", blend_window(tile, overlap_px // 4), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, C, H, W) float32 blended probabilities."""
        batch, _, height, width = images.shape
        (top, bottom), (left, right) = (axis_padding(n, self.tile, self.margin) for n in (height, width))
        padded = reflect_pad(images, top, bottom, left, right)
        padded_h, padded_w = padded.shape[-2:]
        ys = tile_origins(padded_h, self.tile, self.stride)
        xs = tile_origins(padded_w, self.tile, self.stride)
        crop = (slice(None), slice(None), slice(top, top + height), slice(left, left + width))
        if len(ys) == len(xs) == 1:  # the image fits one tile: one pass, nothing to blend
            return torch.cat([self._run(chunk) for chunk in padded.split(self.tile_batch)])[crop]

        window = self.window.to(images.device)
        weight = window[:, None] * window[None, :]
        norm = torch.zeros((padded_h, padded_w), dtype=torch.float32, device=images.device)
        for y in ys:
            for x in xs:
                norm[y : y + self.tile, x : x + self.tile] += weight
        total: torch.Tensor | None = None
        tiles = [(b, y, x) for b in range(batch) for y in ys for x in xs]
        for start in range(0, len(tiles), self.tile_batch):
            chunk = tiles[start : start + self.tile_batch]
            probs = self._run(
                torch.stack([padded[b, :, y : y + self.tile, x : x + self.tile] for b, y, x in chunk])
            )
            if total is None:
                total = probs.new_zeros((batch, probs.shape[1], padded_h, padded_w))
            for (b, y, x), tile_probs in zip(chunk, probs, strict=True):
                total[b, :, y : y + self.tile, x : x + self.tile] += tile_probs * weight
        assert total is not None
        return total[crop] / norm[crop[2:]]

    def _run(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.module(tiles).float()
