"""Kaggle submission files: read the expected ids, check a submission, write it atomically.

A submission is ``id,label`` with one row per test patch, in the order of sample_submission.csv,
and label = the predicted probability of tumour (the metric is ROC AUC, so hard 0/1 labels would
throw the ranking away). Everything here is pure file/array work so the refit and predict CLIs,
and the tests, share one definition of "valid".
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from datasets.errors import DataError, UserError
from datasets.files import atomic_path
from datasets.test_labels import read_id_csv

def check_submission(df: pd.DataFrame, expected_ids: Iterable[str], where: str = "submission") -> None:
    """Raise UserError unless ``df`` is a valid submission for ``expected_ids`` (same ids, same order)."""
    expected = np.asarray(list(expected_ids), dtype=str)
    if list(df.columns) != ["id", "label"]:
        raise UserError(f"{where}: columns are {list(df.columns)}, expected ['id', 'label']")
    if len(df) != len(expected):
        raise UserError(f"{where}: {len(df)} rows, expected {len(expected)} (one per test id)")
    ids = df["id"].astype(str).to_numpy()
    mismatch = np.flatnonzero(ids != expected)
    if len(mismatch):
        i = int(mismatch[0])
        raise UserError(f"{where} row {i + 2}: id {str(ids[i])!r} where sample_submission.csv has {str(expected[i])!r}")
    label = pd.to_numeric(df["label"], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(label) | (label < 0) | (label > 1))
    if len(bad):
        i = int(bad[0])
        raise UserError(f"{where} row {i + 2}: label {df['label'].iloc[i]} is not a probability in [0, 1]")


def exact_floats(probs) -> np.ndarray:
    """``probs`` as float32 when they are float32 (a model's output), else float64: written with repr,
    either reads back to the very same value."""
    probs = np.asarray(probs)
    return probs if probs.dtype == np.float32 else probs.astype(np.float64)


def write_submission(path: Path, ids: np.ndarray, probs: np.ndarray, expected_ids: Iterable[str] | None = None) -> Path:
    """Write ``id,label`` atomically; the file read back is validated before it replaces ``path``.

    A crash at any point leaves either the previous submission or the new complete one, never a
    truncated file; a submission that fails validation never reaches ``path``.
    """
    path = Path(path)
    expected = ids if expected_ids is None else expected_ids
    df = pd.DataFrame({"id": np.asarray(ids, dtype=str), "label": exact_floats(probs)})
    check_submission(df, expected, where=f"submission for {path}")
    with atomic_path(path) as tmp:
        # No float_format: pandas writes each float's shortest exact repr, so the file ranks the test
        # patches exactly as the model did (%.6g turned distinct probabilities near 0 and 1 into ties).
        df.to_csv(tmp, index=False)
        check_submission(read_id_csv(tmp, "submission"), expected, where=f"submission {tmp}")
    return path

