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
        print(f"error: {one_line(exc)}", file=sys.stderr)
        raise SystemExit(2) from None


def one_line(exc: UserError) -> str:
    """The message of a UserError; one raised in a DataLoader worker comes back wrapped in the worker's
    traceback ("Caught UserError in DataLoader worker process 0. Original Traceback ..."), whose last
    line is the original message."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    prefix = f"{UserError.__module__}.{UserError.__qualname__}: "
    return last.removeprefix(prefix)
