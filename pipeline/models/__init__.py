"""Models: building them from a recipe, their checkpoints, the extra architectures, the losses."""
