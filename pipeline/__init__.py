"""trashseg: COCO polygons in, cross-validated segmentation models and a leaderboard CSV out."""

import os

# albumentations asks PyPI for a newer release when first imported; a pipeline must not reach the
# network at run time (offline clusters hang on it), so this is off unless the user turns it on.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
