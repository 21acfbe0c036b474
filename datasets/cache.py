"""Decode-once cache: every patch decoded a single time into one uint8 N x 96 x 96 x 3 file.

Afterwards the file is memory-mapped read-only, so all trials of a search (separate processes)
share the same page-cache pages and a batch is one fancy-index away (nanoGPT's prepare.py idea).

A cache folder is named by a fingerprint of its source (file names, sizes, mtimes and the csvs'
content): a changed dataset gets a new folder, an unchanged one reopens in milliseconds. It is
built in a temp folder and renamed into place only when complete, so a build killed half-way
leaves nothing a later load could mistake for a good cache.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datasets.defaults import default_cache_root
from datasets.errors import DataError
from datasets.files import clean_stale_temps, fsync_path, temp_path
from datasets.source import CACHE_VERSION, Source

SHAPE = (96, 96, 3)
IMAGES, INDEX, META = "images.u8", "index.npz", "meta.json"


@dataclass
class PatchCache:
    path: Path
    images: np.ndarray  # (N, 96, 96, 3) uint8, read-only memmap
    ids: np.ndarray  # str
    labels: np.ndarray  # int8, -1 = unknown
    split: np.ndarray  # str: train | valid | test
    groups: np.ndarray | None  # str slide id per patch, or None
    fingerprint: str
    source: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split).astype(np.int64)

    def summary(self) -> dict:
        out = {}
        for s in ("train", "valid", "test"):
            idx = self.indices(s)
            if len(idx):
                lab = self.labels[idx]
                out[s] = {"n": int(len(idx)), "pos": int((lab == 1).sum()), "neg": int((lab == 0).sum()),
                          "unlabelled": int((lab < 0).sum())}
        return out


def open_cache(path: str | os.PathLike) -> PatchCache:
    """Reopen a complete cache folder (e.g. in a Ray worker): memory map + index, no decoding."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
        n = int(meta["n"])
        if meta.get("version") != CACHE_VERSION or (path / IMAGES).stat().st_size != n * int(np.prod(SHAPE)):
            raise ValueError("size or version mismatch")
        with np.load(path / INDEX, allow_pickle=False) as idx:
            ids, labels, split = idx["ids"], idx["labels"], idx["split"]
            groups = idx["groups"] if "groups" in idx.files else None
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path}: not a complete pcam-tune cache ({e}); delete it and run "
                        f"`python -m datasets.prepare` to rebuild") from None
    images = np.memmap(path / IMAGES, dtype=np.uint8, mode="r", shape=(n, *SHAPE)) if n else np.empty((0, *SHAPE), np.uint8)
    return PatchCache(path, images, ids, labels, split, groups, meta["fingerprint"], meta.get("source", {}))


def build_cache(src: Source, final: Path, progress: bool = True) -> PatchCache:
    """Decode ``src`` into ``final`` atomically (temp folder, fsync, rename)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(final.parent)  # builds whose process is gone (killed, crashed) are garbage
    tmp = temp_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        n = len(src.ids)
        if n:
            images = np.memmap(tmp / IMAGES, dtype=np.uint8, mode="w+", shape=(n, *SHAPE))
            src.fill(images, progress)
            images.flush()
            del images
        else:
            (tmp / IMAGES).touch()
        arrays = dict(ids=src.ids.astype(str), labels=src.labels.astype(np.int8), split=src.split.astype(str))
        if src.groups is not None:
            arrays["groups"] = src.groups.astype(str)
        np.savez(tmp / INDEX, **arrays)
        meta = {"version": CACHE_VERSION, "n": n, "shape": list(SHAPE), "fingerprint": src.fingerprint,
                "source": {"kind": src.kind, "data_dir": str(src.data_dir)},
                "built_seconds": round(time.perf_counter() - t0, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / META).write_text(json.dumps(meta, indent=1))
        for f in (IMAGES, INDEX, META):
            fsync_path(tmp / f)
        try:
            os.rename(tmp, final)
        except OSError:  # another process completed the same cache first; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return open_cache(final)


def load_source(data_dir: Path, kind: str = "kaggle", slide_map: str | os.PathLike | None = None) -> Source:
    """Pick the loader for ``data_dir`` (Kaggle layout or PCam HDF5) and describe it for the cache."""
    from datasets import kaggle, pcam_h5

    if not data_dir.is_dir():
        raise DataError(f"data dir {data_dir}: not found; pass --data-dir pointing at a folder with train/ and "
                        f"train_labels.csv (Kaggle layout) or the PCam camelyonpatch_level_2_split_*.h5 files")
    if pcam_h5.is_pcam_h5_layout(data_dir):
        return pcam_h5.source(data_dir)
    if not kaggle.is_kaggle_layout(data_dir):
        raise DataError(f"data dir {data_dir}: holds neither the Kaggle layout (train/ + train_labels.csv) nor the "
                        f"PCam HDF5 files (camelyonpatch_level_2_split_*_x.h5); point --data-dir at one of those")
    return kaggle.source(kaggle.load_kaggle(data_dir, slide_map), kind)


def prepare_dataset(data_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                    progress: bool = True, slide_map: str | os.PathLike | None = None) -> PatchCache:
    """Validate ``data_dir`` (None: the embedded synthetic dataset), build or reuse its cache, return it mapped."""
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_root()
    kind = "kaggle"
    if data_dir is None:
        from datasets.synthetic import ensure_synthetic
        data_dir, kind = ensure_synthetic(root / "synthetic"), "synthetic"
    src = load_source(Path(data_dir).expanduser().resolve(), kind, slide_map)
    final = root / f"{src.kind}-{src.fingerprint[:16]}"
    if (final / META).is_file():
        try:
            return open_cache(final)
        except DataError:  # damaged by hand: rebuild rather than fail
            shutil.rmtree(final, ignore_errors=True)
    return build_cache(src, final, progress)
