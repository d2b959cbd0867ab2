"""Entry point of `python -m pipeline`: `pipeline.orchestration.cli`'s commands, one-line user errors."""

from pipeline.errors import run_main
from pipeline.orchestration.cli import main

run_main(main)
