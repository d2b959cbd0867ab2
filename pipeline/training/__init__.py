"""Training one (model recipe, fold): the loop, its data, augmentation, state, resume and runtime."""
