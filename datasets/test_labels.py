"""Labels of a test split, for scoring (never for training): an ``id,label`` csv such as
pcam_sample/test_labels.csv, or the labels a PCam HDF5 cache already holds. The refit (``--test-labels``) and
trainables.bench's parity figures read them through here, so both check them the same way."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from datasets import kaggle
from datasets.errors import DataError


def read_id_csv(path: Path, what: str, need_label: bool = False) -> pd.DataFrame:
    """An ``id[,label]`` csv as a DataFrame of strings, read and checked by datasets.kaggle's reader (one-line
    DataError naming the file and line: not found, empty, missing columns, unsafe or duplicate ids)."""
    rows = kaggle.read_table(Path(path), ("id", "label") if need_label else ("id",), f"pass the {what} (an id,label csv)")
    kaggle.check_ids(Path(path), rows)
    return pd.DataFrame([r for _, r in rows], dtype=str)


def read_test_labels(path: Path, ids: np.ndarray) -> np.ndarray:
    """Labels (0/1, int8) of ``ids`` from an ``id,label`` CSV such as pcam_sample/test_labels.csv."""
    df = read_id_csv(path, "--test-labels file", need_label=True)
    labels = df["label"].map(kaggle.binary_label)
    bad = labels.isna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"--test-labels file {path} row {row + 2}: label {str(df['label'].iloc[row])!r} is not 0 or 1")
    by_id = pd.Series(labels.to_numpy(dtype=np.int8), index=df["id"])
    missing = pd.Index(ids).difference(by_id.index)
    if len(missing):
        raise DataError(
            f"--test-labels file {path} has no label for {len(missing)} of the {len(ids)} test ids "
            f"(e.g. {missing[0]}): pass the labels of this test set"
        )
    return by_id.loc[list(ids)].to_numpy()


def find_test_labels(cache, test_idx: np.ndarray, ids: np.ndarray, arg: str | None) -> tuple[np.ndarray | None, str | None]:
    """Test labels and where they came from: --test-labels, the cache (PCam HDF5), or test_labels.csv beside the data."""
    if arg:
        return read_test_labels(Path(arg), ids), str(arg)
    labels = cache.labels[test_idx]
    if len(labels) and (labels >= 0).all():
        return labels.astype(np.int8), "the cache's test split"
    data_dir = cache.source.get("data_dir")
    beside = Path(data_dir) / "test_labels.csv" if data_dir else None
    if beside is not None and beside.is_file():
        return read_test_labels(beside, ids), str(beside)
    return None, None
