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


def check_writable(path, option: str, directory: bool = False):
    """Refuse, in one UserError line and before any work, an output that cannot be written.

    ``path``: a file to be written (its folder must exist and take a new file; an existing ``path`` must be a
    file), or with ``directory`` a folder (created if missing). Tested by writing and removing a temporary file
    there, since permission bits do not tell (root, read-only mounts, /proc). ``option``: the command-line option
    that named it, e.g. "--out". Returns the path as a Path.
    """
    import os
    import tempfile
    from pathlib import Path

    path = Path(path).expanduser()
    folder = path if directory else path.parent
    what = "folder" if directory else "file"
    if not directory and path.is_dir():
        raise UserError(f"{option} {path}: is a folder; give a file path")
    try:
        if directory:
            folder.mkdir(parents=True, exist_ok=True)
        if not folder.is_dir():
            raise FileNotFoundError(f"no folder {folder}")
        fd, probe = tempfile.mkstemp(prefix=".pcam-tune-write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
        if not directory and path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is read-only")
    except OSError as e:
        reason = e.strerror or str(e)
        raise UserError(f"{option} {path}: cannot write this {what} ({reason}); choose a writable path") from None
    return path
