"""What a loader hands the cache builder (``Source``) and the fingerprint that names a cache folder.

Kept apart from datasets.cache so that the loaders (datasets.kaggle, datasets.pcam_h5) and the cache builder
all import it one way: loaders -> source <- cache -> loaders.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from datasets.errors import DataError

CACHE_VERSION = 1


@dataclass
class Source:
    """What a loader hands the cache builder: the index, and how to fill the pixel array."""
    kind: str
    data_dir: Path
    ids: np.ndarray
    labels: np.ndarray
    split: np.ndarray
    groups: np.ndarray | None
    fingerprint: str
    fill: Callable[[np.ndarray, bool], None]  # fill(images_out, progress)


def fingerprint(kind: str, stat_files: list[Path], content_files: list[Path], extra: str = "") -> str:
    """Hash of names+sizes+mtimes of ``stat_files`` and the bytes of ``content_files`` (small csvs)."""
    h = hashlib.sha256(f"pcam-tune-cache v{CACHE_VERSION} {kind} {extra}\n".encode())
    for p in content_files:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    for p in stat_files:
        try:
            st = p.stat()
        except FileNotFoundError:
            raise DataError(f"{p}: listed but missing; restore the file or remove its row") from None
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
