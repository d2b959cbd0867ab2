"""Data stages' library: COCO to masks, manifest, folds, demo set, pseudo-labels, geometry, loaders."""
