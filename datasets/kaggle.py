"""The Kaggle "Histopathologic Cancer Detection" folder layout, read and checked.

    DIR/train/<id>.tif   DIR/train_labels.csv (id,label)
    DIR/test/<id>.tif    DIR/sample_submission.csv (id,label)   (test part optional)
    DIR/slide_map.csv    (id,slide; optional patch -> whole-slide-image map, for leak-free splits)

Every problem found becomes one DataError line naming the file and row and what to do about it.
Images themselves are decoded (and checked) once, when the cache is built (datasets.images).
"""
from __future__ import annotations

import csv
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasets.errors import DataError
from datasets.source import Source, fingerprint

TRAIN_CSV = "train_labels.csv"
SUBMISSION_CSV = "sample_submission.csv"
SLIDE_MAP_CSV = "slide_map.csv"
# Kaggle ids are 40-char hex digests; accept any plain file stem, refuse anything that could leave the folder.
_SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


@dataclass
class KaggleData:
    data_dir: Path
    train_ids: np.ndarray  # str
    train_labels: np.ndarray  # int8, 0/1
    test_ids: np.ndarray  # str, in sample_submission.csv order (empty when there is no test part)
    slides: dict[str, str] | None  # patch id -> slide id, when a slide map is known

    def train_paths(self) -> list[Path]:
        return [self.data_dir / "train" / f"{i}.tif" for i in self.train_ids]

    def test_paths(self) -> list[Path]:
        return [self.data_dir / "test" / f"{i}.tif" for i in self.test_ids]


def is_kaggle_layout(data_dir: Path) -> bool:
    return (data_dir / TRAIN_CSV).exists() or (data_dir / "train").is_dir()


def read_table(path: Path, columns: tuple[str, ...], fix: str) -> list[tuple[int, dict[str, str]]]:
    """Rows of a csv as (line number, row) with the required ``columns`` checked; ``fix`` says how to get one.

    The one reader of pcam-tune's csvs: the Kaggle layout's, slide maps, and the ``id[,label]`` files of
    datasets.test_labels (test labels, sample submissions, submissions read back).
    """
    if not path.is_file():
        raise DataError(f"{path}: not found; {fix}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            if not header:
                raise DataError(f"{path}: file is empty, not a readable CSV; expected a header '{','.join(columns)}' "
                                f"and one row per patch")
            missing = [c for c in columns if c not in header]
            if missing:
                raise DataError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}: its header "
                                f"{','.join(header)!r} lacks column(s) the file needs; the header must be '{','.join(columns)}'")
            reader.fieldnames = header
            rows = [(n + 2, {k: (v or "").strip() for k, v in r.items() if k is not None}) for n, r in enumerate(reader)]
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a readable CSV (not UTF-8 text); save it as plain csv with header "
                        f"'{','.join(columns)}'") from None
    if not rows:
        raise DataError(f"{path}: has a header but no rows; expected one row per patch")
    return rows


def check_ids(path: Path, rows: list[tuple[int, dict[str, str]]]) -> np.ndarray:
    """Ids of ``rows``: unique and safe to use as file names."""
    seen: dict[str, int] = {}
    for line, r in rows:
        i = r["id"]
        if not _SAFE_ID.match(i) or i in (".", ".."):
            raise DataError(f"{path} line {line}: id {i!r} is not a safe file name (no paths, '..' or leading dots); "
                            f"ids must be plain file stems like the Kaggle hashes")
        if i in seen:
            raise DataError(f"{path} line {line}: duplicate id {i!r}: id {i!r} appears more than once (first at line "
                            f"{seen[i]}); remove one of the rows")
        seen[i] = line
    return np.array([r["id"] for _, r in rows], dtype=str)


def read_labels(path: Path, fix: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels) of an id,label csv, with every row checked."""
    rows = read_table(path, ("id", "label"), fix)
    ids = check_ids(path, rows)
    labels = np.empty(len(rows), np.int8)
    for k, (line, r) in enumerate(rows):
        label = binary_label(r["label"])
        if label is None:
            raise DataError(f"{path} line {line}: label {r['label']!r} of id {r['id']!r} is not 0 or 1; fix the row")
        labels[k] = label
    return ids, labels


def binary_label(text: str) -> int | None:
    """0 or 1 from a csv cell ("0", "1", "0.0", "1.0"); None for anything else."""
    return {"0": 0, "1": 1, "0.0": 0, "1.0": 1}.get(text)


def _check_files(folder: Path, ids: np.ndarray, listed_in: Path) -> None:
    for k, i in enumerate(ids):
        if not (folder / f"{i}.tif").is_file():
            raise DataError(f"{folder / (i + '.tif')}: listed in {listed_in.name} (line {k + 2}) but missing; "
                            f"restore the file or remove its row")


def read_slide_map(path: Path, train_ids: np.ndarray) -> dict[str, str]:
    rows = read_table(path, ("id", "slide"), "")
    check_ids(path, rows)
    slides = {r["id"]: r["slide"] for _, r in rows}
    missing = [i for i in train_ids if not slides.get(i)]
    if missing:
        raise DataError(f"{path}: {len(missing)} train id(s) have no slide (e.g. {missing[0]!r}); "
                        f"add them, or remove the slide map to split by patch instead of by slide")
    return slides


def load_kaggle(data_dir: str | os.PathLike, slide_map: str | os.PathLike | None = None) -> KaggleData:
    """Read and check the Kaggle layout in ``data_dir`` (everything but the pixels)."""
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"data dir {d}: not found; pass --data-dir pointing at a folder with train/ and "
                        f"{TRAIN_CSV} (Kaggle layout) or the PCam .h5 files")
    ids, labels = read_labels(d / TRAIN_CSV, f"the Kaggle layout needs {TRAIN_CSV} (id,label) beside train/")
    if not (d / "train").is_dir():
        raise DataError(f"{d / 'train'}: folder not found; put the training patches there as <id>.tif")
    _check_files(d / "train", ids, d / TRAIN_CSV)
    if len(np.unique(labels)) < 2:
        raise DataError(f"{d / TRAIN_CSV}: every label is {int(labels[0])}; ROC AUC needs both classes, "
                        f"add patches of the other class")

    test_ids = np.array([], dtype=str)
    sub, test_dir = d / SUBMISSION_CSV, d / "test"
    if sub.exists() or test_dir.is_dir():
        test_ids = check_ids(sub, read_table(sub, ("id", "label"),
                                             f"a test/ folder needs {SUBMISSION_CSV} (id,label) listing its patches"))
        if not test_dir.is_dir():
            raise DataError(f"{test_dir}: folder not found but {sub.name} lists {len(test_ids)} test ids; "
                            f"put the test patches there as <id>.tif")
        on_disk = {p.stem for p in test_dir.iterdir() if p.suffix.lower() == ".tif"}
        listed = set(test_ids.tolist())
        extra, absent = sorted(on_disk - listed), [i for i in test_ids if i not in on_disk]
        if extra or absent:
            what = []
            if absent:
                what.append(f"{len(absent)} id(s) of {sub.name} have no tif (e.g. {absent[0]!r})")
            if extra:
                what.append(f"{len(extra)} tif(s) are not in {sub.name} (e.g. {extra[0]!r})")
            raise DataError(f"{test_dir}: disagrees with {sub.name}: {'; '.join(what)}; "
                            f"the folder and the csv must list the same patches")

    slides = None
    sm = Path(slide_map) if slide_map else d / SLIDE_MAP_CSV
    if slide_map or sm.exists():
        slides = read_slide_map(sm, ids)
    return KaggleData(d, ids, labels, test_ids, slides)


def source_files(data: KaggleData) -> list[Path]:
    """Every file the cache's content depends on (for its fingerprint)."""
    files = [data.data_dir / TRAIN_CSV, *data.train_paths()]
    if len(data.test_ids):
        files += [data.data_dir / SUBMISSION_CSV, *data.test_paths()]
    return files


def source(data: KaggleData, kind: str = "kaggle") -> Source:
    """What the cache builder needs of a checked Kaggle layout (``kind`` "synthetic" for the embedded set)."""
    from datasets.images import read_patches_into

    n_train, n_test = len(data.train_ids), len(data.test_ids)
    ids = np.concatenate([data.train_ids, data.test_ids]).astype(str)
    labels = np.concatenate([data.train_labels, np.full(n_test, -1, np.int8)])
    split = np.array(["train"] * n_train + ["test"] * n_test, dtype=str)
    groups = None
    content = [data.data_dir / TRAIN_CSV] + ([data.data_dir / SUBMISSION_CSV] if n_test else [])
    if data.slides is not None:
        groups = np.array([data.slides.get(i, "") for i in ids], dtype=str)
    fp = fingerprint(kind, source_files(data), content,
                     extra="slides:" + hashlib.sha256(groups.tobytes()).hexdigest() if groups is not None else "")

    def fill(out: np.ndarray, progress: bool) -> None:
        read_patches_into(out, data.train_paths() + data.test_paths(), progress=progress, desc="decode patches")

    return Source(kind, data.data_dir, ids, labels, split, groups, fp, fill)
