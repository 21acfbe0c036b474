"""One-line user errors shared by every pcam-tune command.

Anything the user can fix (a bad file, a bad option, missing weights) is raised as a
``UserError`` whose message names the file/row/option and says what to do. The CLI entry
points wrap ``main`` with ``run_cli`` so such errors print as one line on stderr and exit 2,
never as a traceback.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable


class UserError(Exception):
    """An error the user can fix; its message is one self-contained line."""

    exit_code = 2


class DataError(UserError):
    """The data on disk is missing, malformed or inconsistent."""


def run_cli(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a CLI ``main`` so a UserError (or Ctrl-C) ends with one line, not a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper
