"""An offline inference bundle: the fitted ensemble in one folder, predicted from without the workspace."""
