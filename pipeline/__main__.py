"""Entry point of `python -m pipeline`: the commands of `pipeline.cli`, with one-line user errors."""

from pipeline.cli import main
from pipeline.errors import run_main

run_main(main)
