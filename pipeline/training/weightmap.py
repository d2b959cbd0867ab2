"""The U-Net paper's per-pixel loss weight map: class balance plus a term that separates touching objects."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.config import TrainParams

# Distances are only computed out to REACH_SIGMAS * sigma from each object: beyond, the separation term
# is below w0 * exp(-REACH_SIGMAS**2 / 2) = w0 * 1.5e-8 and is defined as 0 (see `separation_term`).
REACH_SIGMAS = 6.0


@dataclass(frozen=True)
class BoundaryWeighting:
    """What `boundary_weights` needs besides the maps: train.boundary_* and the number of classes."""

    w0: float
    sigma: float
    class_balance: bool
    n_classes: int

    def __post_init__(self) -> None:
        if not (self.w0 >= 0 and self.sigma > 0 and self.n_classes >= 1):
            raise ValueError(
                f"BoundaryWeighting needs w0 >= 0, sigma > 0, n_classes >= 1, got w0={self.w0}, "
                f"sigma={self.sigma}, n_classes={self.n_classes}"
            )

    @property
    def needs_instances(self) -> bool:
        """Whether the weights depend on the instance map (only the separation term does)."""
        return self.w0 > 0

    def weights(self, instances: np.ndarray | None, labels: np.ndarray) -> np.ndarray:
        """`boundary_weights` of these maps with these settings (instances may be None when w0 is 0)."""
        return boundary_weights(instances, labels, self.n_classes, self.w0, self.sigma, self.class_balance)


def boundary_weighting(train: TrainParams, n_classes: int) -> BoundaryWeighting | None:
    """The weighting train.boundary_* asks for, or None when it is a map of ones (w0 0, no class balance)."""
    if train.boundary_w0 == 0 and not train.boundary_class_balance:
        return None
    return BoundaryWeighting(train.boundary_w0, train.boundary_sigma, train.boundary_class_balance, n_classes)


def boundary_weights(
    instances: np.ndarray | None,
    labels: np.ndarray,
    n_classes: int,
    w0: float,
    sigma: float,
    class_balance: bool,
) -> np.ndarray:
    """The U-Net paper's weight map w = w_c + w0 * exp(-(d1 + d2)^2 / (2 sigma^2)), float32 (H, W).

    instances: int (H, W), 0 = no object, k > 0 = object k (one annotation, possibly in several pieces);
    labels: int (H, W) class indexes 0..n_classes-1 (0 background), the mask the loss is computed on.
    `instances` may be None when w0 is 0 (the term is then not computed).

    w_c(x): 1 everywhere, or with `class_balance` the inverse pixel frequency of x's class in this
    image, normalised so that w_c has mean 1 over the image's pixels. With n_c pixels of class c among
    the image's N and P classes present (background counts as a class): w_c = N / (P * n_c). So each
    present class gets the same total weight N / P, and an image of one class gets all ones.

    The separation term (`separation_term`) applies to every pixel, objects and background alike, with
    d_k(x) the Euclidean distance from x to the nearest pixel of object k (0 on object k itself) and d1,
    d2 the smallest and second smallest d_k(x) over the objects. On background this is the paper's term,
    high in narrow gaps between objects. On an object's own pixels d1 is 0 and d2 the distance to the
    nearest other object, so where two objects touch with no background between them (the overlap rule
    leaves none), the pixels of both along the shared border get nearly 1 + w0: exactly the pixels that
    decide where one object ends and the other starts. Restricted to background pixels, touching
    objects would get no extra weight at all. (For two touching objects of one class the mask has no
    label that separates them: the weight then stresses getting the seam's pixels right.) With fewer
    than two objects there is no d2 and the term is 0.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {labels.shape}")
    if class_balance:
        weights = class_balance_weights(labels, n_classes)
    else:
        weights = np.ones(labels.shape, dtype=np.float32)
    if w0 > 0:
        if instances is None or np.shape(instances) != labels.shape:
            shape = None if instances is None else np.shape(instances)
            raise ValueError(f"instances must be given with the labels' shape {labels.shape}, got {shape}")
        weights += np.float32(w0) * separation_term(instances, sigma)
    return weights


def class_balance_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """w_c of `boundary_weights`: N / (P * n_c) at each pixel of class c, float32 (H, W), mean 1."""
    flat = np.asarray(labels).ravel()
    if flat.size and (flat.min() < 0 or flat.max() >= n_classes):
        raise ValueError(f"labels must lie in 0..{n_classes - 1}, got {flat.min()}..{flat.max()}")
    counts = np.bincount(flat, minlength=n_classes)
    present = counts > 0
    per_class = np.zeros(n_classes, dtype=np.float64)
    per_class[present] = flat.size / (np.count_nonzero(present) * counts[present])
    return per_class.astype(np.float32)[labels]


def separation_term(instances: np.ndarray, sigma: float) -> np.ndarray:
    """exp(-(d1 + d2)^2 / (2 sigma^2)) at each pixel, float32 (H, W) in [0, 1]; 0 with fewer than 2 objects.

    d1, d2 as in `boundary_weights`. Defined as 0 where d1 + d2 > REACH_SIGMAS * sigma (the term is
    below 1.5e-8 there), which lets `nearest_two_distances` work on each object's neighbourhood only.
    """
    reach = REACH_SIGMAS * sigma
    d1, d2 = nearest_two_distances(instances, reach)
    total = d1 + d2  # inf where fewer than two objects lie within reach
    near = total <= reach
    term = np.zeros(total.shape, dtype=np.float32)
    term[near] = np.exp(-(total[near] ** 2) / (2.0 * sigma * sigma))
    return term


def nearest_two_distances(instances: np.ndarray, reach: float) -> tuple[np.ndarray, np.ndarray]:
    """(d1, d2) float64 (H, W): distances to the nearest and second nearest object, exact wherever they
    are at most `reach`, and above `reach` (inf where no object is near) elsewhere.

    d_k comes from `scipy.ndimage.distance_transform_edt` of "not object k" on object k's bounding box
    grown by `reach`: every pixel within `reach` of object k lies in that box, and the box holds all of
    object k, so the distances there are exact. A running top-2 over the objects keeps memory at two
    (H, W) maps whatever the number of objects, and the boxes keep the cost near the objects' areas.
    """
    instances = np.asarray(instances)
    if instances.ndim != 2:
        raise ValueError(f"instances must be (H, W), got shape {instances.shape}")
    if instances.dtype.kind not in "iu":
        raise ValueError(f"instances must be an integer map, got {instances.dtype}")
    d1 = np.full(instances.shape, np.inf)
    d2 = np.full(instances.shape, np.inf)
    if instances.size == 0 or instances.max() <= 0:
        return d1, d2
    if instances.min() < 0:
        raise ValueError(f"instances must be >= 0, got {instances.min()}")
    boxes = ndimage.find_objects(instances)  # boxes[k - 1]: object k's bounding box, None if absent
    pad = math.ceil(reach)
    height, width = instances.shape
    for k, box in enumerate(boxes, start=1):
        if box is None:
            continue
        rows = slice(max(box[0].start - pad, 0), min(box[0].stop + pad, height))
        cols = slice(max(box[1].start - pad, 0), min(box[1].stop + pad, width))
        d_k = ndimage.distance_transform_edt(instances[rows, cols] != k)
        near1, near2 = d1[rows, cols], d2[rows, cols]  # views: updated in place
        np.minimum(near2, np.maximum(near1, d_k), out=near2)  # the old nearest or d_k, whichever is larger
        np.minimum(near1, d_k, out=near1)
    return d1, d2
