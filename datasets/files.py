"""Publishing a file whole: written beside its final path under one temporary name, then renamed over it.

Every file the product publishes (submission.csv, model.pt, best_config.json, search.json, slide maps, the
recorded bench table, downloaded weights, the refit's `refit` symlink) and every folder it builds in place (the
decode-once cache, the synthetic data, the embedding cache) goes through here, so a reader sees the previous
version or the new complete one, never half a file, and a killed writer leaves only a temporary that the next
writer removes. One naming convention, so one clean-up knows them all:

    <folder>/.<final name>.tmp-<pid>

The temporary sits in the final path's folder (a rename is atomic only within one file system) and carries its
writer's pid, so a live writer's temporary is told apart from a dead one's.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from datasets.errors import UserError

TMP_MARK = ".tmp-"


def temp_path(final: str | os.PathLike) -> Path:
    """This process's temporary for ``final``: ``<folder>/.<name>.tmp-<pid>``."""
    final = Path(final)
    return final.with_name(f".{final.name}{TMP_MARK}{os.getpid()}")


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (temporaries carry their writer's pid, so stale ones can be told apart)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a written file to disk before it is renamed into place; on a folder, make the renames in it durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """A temporary, whatever it became (a file, a symlink, a folder being built)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale_temps(folder: str | os.PathLike, name: str = "*") -> list[Path]:
    """Remove the temporaries of ``name`` (default: of every file) in ``folder`` whose writer is dead.

    A writer killed between writing its temporary and renaming it leaves the temporary behind (the published
    file is untouched); this process's own and those of live processes are kept. Returns what was removed.
    """
    removed = []
    for tmp in sorted(Path(folder).glob(f".{name}{TMP_MARK}*")):
        pid = tmp.name.rsplit(TMP_MARK, 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        remove(tmp)
        removed.append(tmp)
    return removed


def _cannot_write(final: Path, e: OSError) -> UserError:
    """The OSError of writing ``final`` (a read-only or full disk, no such folder, /proc) as one line."""
    return UserError(f"cannot write {final}: {e.strerror or e} ({e.filename}); choose a writable folder")


@contextmanager
def atomic_path(final: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """The temporary path to write ``final`` through, for writers that take a path (pandas, torch.save, a symlink).

    On a clean exit the temporary is flushed to disk (``fsync``) and renamed over ``final``; on any error it is
    removed and ``final`` stays as it was. The folder is created when missing; an unwritable one is a UserError.
    """
    final = Path(final)
    tmp = temp_path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cannot_write(final, e) from None
    remove(tmp)  # this pid's own leftover (a recycled pid)
    try:
        yield tmp
        if fsync and not tmp.is_symlink():
            fsync_path(tmp)
        os.replace(tmp, final)
    except OSError as e:
        remove(tmp)
        if e.filename in (str(tmp), str(final), tmp, final):  # the write itself failed, not the caller's own reading
            raise _cannot_write(final, e) from None
        raise
    except BaseException:
        remove(tmp)
        raise


@contextmanager
def atomic_write(final: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """``open(final, mode)`` that publishes ``final`` whole on a clean exit (see atomic_path)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes a whole file: mode 'w' or 'wb', not {mode!r}")
    with atomic_path(final) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()


def write_atomically(final: str | os.PathLike, data: str | bytes) -> Path:
    """Publish ``data`` as ``final`` (text as UTF-8)."""
    with atomic_write(final, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return Path(final)
