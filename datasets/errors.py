"""One-line user errors shared by every pcam-tune command.

Anything the user can fix (a bad file, a bad option, missing weights) is raised as a
``UserError`` whose message names the file/row/option and says what to do. The CLI entry
points wrap ``main`` with ``run_cli`` so such errors print as one line on stderr and exit 2,
never as a traceback.
"""
from __future__ import annotations

import argparse
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


def check_writable(path: str | os.PathLike, option: str, directory: bool = False) -> Path:
    """Refuse, in one UserError line and before any work, an output that cannot be written, so a long job fails at
    its start, not at its end. ``path``: a file to create or replace (its missing folders are created when it is
    written, as the writers do), or with ``directory`` a folder (created now if missing). Tested by creating and
    removing a temporary file there, since permission bits do not tell (root, read-only mounts, /proc).
    ``option``: the command-line option that named it, e.g. "--out"."""
    path = Path(path).expanduser()
    if not directory and path.is_dir():
        raise UserError(f"{option} {path}: is a folder; give a file name")
    folder = path if directory else path.parent
    while not folder.exists() and folder != folder.parent:  # the folders the writer would create
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{option} {path}: {folder} is a file, not a folder; choose another path")
    try:
        if directory:
            path.mkdir(parents=True, exist_ok=True)
            folder = path
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".pcam-tune-write-check-"):
            pass
        if not directory and path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is read-only")
    except OSError as e:
        raise UserError(f"{option} {path}: cannot write into {folder} ({e.strerror or e}); "
                        "choose a writable path") from None
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


def renamed_option(new: str) -> type[argparse.Action]:
    """An argparse action for an option's old name: still accepted, with a one-line warning naming ``new``.
    Use: ``p.add_argument("--old", dest=<new's dest>, action=renamed_option("--new"), help=argparse.SUPPRESS)``."""

    class Renamed(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"warning: {option_string} is deprecated for this command, use {new} {values}", file=sys.stderr)
            setattr(namespace, self.dest, values)

    return Renamed
