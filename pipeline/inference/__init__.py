"""Inference: probabilities of whole images from checkpoints (TTA, tiling) and out-of-fold predictions."""
