"""One-line user errors shared by every pcam-tune command.

Anything the user can fix (a bad file, a bad option, missing weights) is raised as a
``UserError`` whose message names the file/row/option and says what to do. The CLI entry
points wrap ``main`` with ``run_cli`` so such errors print as one line on stderr and exit 2,
never as a traceback.
"""
from __future__ import annotations

import functools
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable


class UserError(Exception):
    """An error the user can fix; its message is one self-contained line."""

    exit_code = 2


class DataError(UserError):
    """The data on disk is missing, malformed or inconsistent."""


def check_writable(path: str | os.PathLike, option: str) -> Path:
    """``path`` as a file this process can create or replace (its missing folders may be created), checked by
    creating a temporary file beside it, so a long job fails at its start, not at its end."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path}: is a folder; give a file name")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # the folders write_* would create
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{option} {path}: {folder} is a file, not a folder; choose another path")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.check-"):
            pass
    except OSError as e:
        raise UserError(f"{option} {path}: cannot write into {folder} ({e.strerror or type(e).__name__}); "
                        f"choose another path") from None
    return path


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
