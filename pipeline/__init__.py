"""trashseg: COCO polygons in, cross-validated segmentation models and a leaderboard CSV out."""
