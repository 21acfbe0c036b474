"""The official PatchCamelyon HDF5 release, with its own train/valid/test split (test labels included).

    camelyonpatch_level_2_split_{train,valid,test}_x.h5   key 'x': (N, 96, 96, 3) uint8
    camelyonpatch_level_2_split_{train,valid,test}_y.h5   key 'y': (N, 1, 1, 1) uint8
    camelyonpatch_level_2_split_{train,valid,test}_meta.csv  optional; column `wsi` = the patch's slide
each optionally gzipped (.h5.gz, as downloaded from Zenodo). The official split is slide-disjoint,
so it is used as-is; the test labels let users score a held-out test AUC. The meta csvs, when present, give
every patch its whole-slide image (cache.groups): refit folds and datasets.slide_map use them.

Only the small label files are read before the cache-hit test: a multi-GB `_x.h5.gz` is ungzipped once, when
the cache is built (its shape is checked then), never on a search start that finds the cache.
"""
from __future__ import annotations

import gzip
import shutil
import tempfile
from pathlib import Path

import numpy as np

from datasets.errors import DataError
from datasets.source import Source, fingerprint

SPLITS = ("train", "valid", "test")
_CHUNK = 4096


def _file(data_dir: Path, split: str, xy: str) -> Path | None:
    for suffix in (".h5", ".h5.gz"):
        p = data_dir / f"camelyonpatch_level_2_split_{split}_{xy}{suffix}"
        if p.is_file():
            return p
    return None


def is_pcam_h5_layout(data_dir: Path) -> bool:
    return any(_file(data_dir, s, "x") for s in SPLITS)


def _h5py():
    try:
        import h5py
    except ImportError:
        raise DataError("reading the PCam HDF5 files needs h5py: pip install 'pcam-tune[h5]' (or pip install h5py)") from None
    return h5py


class _Opened:
    """An h5 dataset opened for reading, ungzipping to a temp file first when needed."""

    def __init__(self, path: Path, key: str):
        self.path, self.key, self._tmp = path, key, None

    def __enter__(self):
        h5py = _h5py()
        target = self.path
        if self.path.suffix == ".gz":
            self._tmp = tempfile.NamedTemporaryFile(suffix=".h5")
            with gzip.open(self.path, "rb") as src:
                shutil.copyfileobj(src, self._tmp, length=1 << 24)
            self._tmp.flush()
            target = Path(self._tmp.name)
        try:
            self._f = h5py.File(target, "r")
        except (OSError, gzip.BadGzipFile) as e:
            raise DataError(f"{self.path}: not a readable HDF5 file ({e}); re-download it") from None
        if self.key not in self._f:
            self._f.close()
            raise DataError(f"{self.path}: has no dataset {self.key!r} (found {list(self._f)}); "
                            f"is it an official PCam camelyonpatch file?")
        return self._f[self.key]

    def __exit__(self, *exc):
        self._f.close()
        if self._tmp:
            self._tmp.close()


def _labels(data_dir: Path, split: str) -> tuple[Path, Path, np.ndarray]:
    x, y = _file(data_dir, split, "x"), _file(data_dir, split, "y")
    if x is None or y is None:
        missing = f"camelyonpatch_level_2_split_{split}_{'x' if x is None else 'y'}.h5"
        raise DataError(f"{data_dir / missing}: not found (nor .h5.gz); the PCam layout needs both _x and _y files "
                        f"of every split present")
    with _Opened(y, "y") as ds:
        labels = np.asarray(ds[:]).reshape(len(ds), -1)[:, 0]
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if len(bad):
        raise DataError(f"{y}: label {labels[bad[0]]} at row {bad[0]} is not 0 or 1; re-download the file")
    return x, y, labels.astype(np.int8)


def _check_images(x: Path, ds, n_labels: int, y: Path) -> None:
    if tuple(ds.shape[1:]) != (96, 96, 3) or ds.dtype != np.uint8:
        raise DataError(f"{x}: dataset 'x' is {ds.dtype}{tuple(ds.shape)}, expected uint8 (N, 96, 96, 3)")
    if len(ds) != n_labels:
        raise DataError(f"{x}: {len(ds)} patches but {y.name} has {n_labels} labels; re-download the pair")


def meta_file(data_dir: Path, split: str) -> Path:
    return data_dir / f"camelyonpatch_level_2_split_{split}_meta.csv"


def read_slides(data_dir: Path, split: str, n: int) -> np.ndarray | None:
    """The `wsi` column of the split's meta csv (one slide per patch, in file order), or None if absent."""
    path = meta_file(data_dir, split)
    if not path.is_file():
        return None
    import pandas as pd

    try:
        meta = pd.read_csv(path, dtype=str)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable csv ({e}); re-download it or remove it") from None
    if "wsi" not in meta.columns:
        raise DataError(f"{path}: no 'wsi' column (found {', '.join(meta.columns)}); is it the official PCam meta csv?")
    if len(meta) != n:
        raise DataError(f"{path}: {len(meta)} rows but the {split} split has {n} patches; re-download the meta csv")
    empty = np.flatnonzero(meta["wsi"].isna().to_numpy())
    if len(empty):
        raise DataError(f"{path}: row {empty[0] + 2} has no wsi; fix the row or remove the file")
    return meta["wsi"].to_numpy(dtype=str)


def source(data_dir: Path):
    present = [s for s in SPLITS if _file(data_dir, s, "x") or _file(data_dir, s, "y")]
    pairs = {s: _labels(data_dir, s) for s in present}
    if "train" not in pairs:
        raise DataError(f"{data_dir}: no camelyonpatch_level_2_split_train_x.h5; the training split is required")
    if len(np.unique(pairs["train"][2])) < 2:
        raise DataError(f"{pairs['train'][1]}: every label is the same; ROC AUC needs both classes")
    ids = np.concatenate([np.char.add(f"{s}_", np.char.zfill(np.arange(len(p[2])).astype(str), 6)) for s, p in pairs.items()])
    labels = np.concatenate([p[2] for p in pairs.values()])
    split = np.concatenate([np.full(len(p[2]), s) for s, p in pairs.items()])
    slides = {s: read_slides(data_dir, s, len(p[2])) for s, p in pairs.items()}
    metas = [meta_file(data_dir, s) for s in pairs if slides[s] is not None]
    groups = None
    if all(v is not None for v in slides.values()):
        groups = np.concatenate(list(slides.values())).astype(str)
    elif metas:
        raise DataError(f"{data_dir}: meta csvs for {', '.join(m.name for m in metas)} but not for every split; "
                        f"add camelyonpatch_level_2_split_<split>_meta.csv for all splits or remove them")
    files = [f for p in pairs.values() for f in p[:2]]

    def fill(out: np.ndarray, progress: bool) -> None:
        from datasets.progress import bar as progress_bar

        start = 0
        with progress_bar(total=len(out), desc="copy PCam h5", unit="img", enabled=progress, leave=False) as bar:
            for s, (x, y, lab) in pairs.items():
                with _Opened(x, "x") as ds:
                    _check_images(x, ds, len(lab), y)
                    for i in range(0, len(lab), _CHUNK):
                        block = ds[i:i + _CHUNK]
                        out[start + i:start + i + len(block)] = block
                        bar.update(len(block))
                start += len(lab)

    return Source("pcam_h5", data_dir, ids.astype(str), labels, split.astype(str), groups,
                  fingerprint("pcam_h5", files, metas), fill)
