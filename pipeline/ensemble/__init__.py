"""The ensemble: member weights fitted on out-of-fold predictions."""
