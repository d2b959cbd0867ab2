"""Running the stages: the command line, the parallel runner, SLURM."""
