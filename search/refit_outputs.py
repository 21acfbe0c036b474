"""The refit's outputs as one unit: a version folder, published by swapping one symlink.

    results/NAME/
      refit-20260101-120000-4242/    model.pt, submission.csv, refit.json, oof.csv, test_roc_curve.png
      refit -> refit-20260101-120000-4242          the published version (os.replace of a symlink: atomic)
      model.pt -> refit/model.pt                   stable paths into whatever version is published
      submission.csv -> refit/submission.csv       ...

A refit writes a fresh version folder, then swaps ``refit`` to it in one rename. So model.pt and
submission.csv always come from the same refit: a kill before the swap leaves the previous pair
published (and an orphan folder the next run removes), a kill after it the new pair.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from datasets.cache import fsync_file, pid_alive
from search.submission import TMP_MARK

CURRENT = "refit"
PREFIX = "refit-"
# Files a refit may write, reachable at results/NAME/<file> through the published version.
ENTRIES = ("model.pt", "submission.csv", "refit.json", "oof.csv", "test_roc_curve.png")


def new_version(out_dir: Path) -> Path:
    """An empty version folder named by time and writer pid (the pid tells a killed writer's folder apart)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    version = out_dir / f"{PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    version.mkdir()
    return version


def published(out_dir: Path) -> Path | None:
    """The published version folder, or None before the first refit."""
    link = out_dir / CURRENT
    return link.resolve() if link.is_symlink() and link.exists() else None


def publish(out_dir: Path, version: Path) -> None:
    """Make ``version`` the published refit in one atomic rename, then drop the version it replaced."""
    for f in version.iterdir():
        if f.is_file():
            fsync_file(f)
    previous = published(out_dir)
    _swap_link(out_dir / CURRENT, version.name)
    _link_entries(out_dir, version)
    _fsync_dir(out_dir)
    if previous is not None and previous != version.resolve():
        shutil.rmtree(previous, ignore_errors=True)


def discard(version: Path) -> None:
    """A refit that failed: its half-written version folder goes (the published one is untouched)."""
    shutil.rmtree(version, ignore_errors=True)


def clean_stale(out_dir: Path) -> list[Path]:
    """Remove version folders of killed refits (never published, writer gone); returns what was removed."""
    current, removed = published(out_dir), []
    for folder in out_dir.glob(f"{PREFIX}*"):
        if not folder.is_dir() or folder.is_symlink() or folder.resolve() == current:
            continue
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
            continue  # another refit of this search is writing it right now
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _swap_link(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}{TMP_MARK}{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _link_entries(out_dir: Path, version: Path) -> None:
    """results/NAME/<file> -> refit/<file> for the files this version has; stale entries go.

    Regular files (the layout before version folders) are removed together first, so a kill half-way
    leaves missing entries, never an old file beside a link to the new refit.
    """
    for name in ENTRIES:
        entry = out_dir / name
        if entry.exists() and not entry.is_symlink():
            entry.unlink()
    for name in ENTRIES:
        entry, target = out_dir / name, f"{CURRENT}/{name}"
        if not (version / name).exists():
            if entry.is_symlink():
                entry.unlink()
        elif not (entry.is_symlink() and os.readlink(entry) == target):
            _swap_link(entry, target)


def _fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (a power cut must not undo the swap)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
