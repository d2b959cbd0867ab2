"""User-facing errors and the command-line wrapper that prints them as one line."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input (a file, a param, a submission): reported without a traceback."""


def run_main(main: Callable[[], None]) -> None:
    """Run a stage or command; a UserError becomes one `error:` line on stderr and exit code 2."""
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
