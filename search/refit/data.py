"""Refit, step 2: the search's data again (its cache reopened, or rebuilt from its data dir and slide map), the
labelled rows to train on, and the test ids the submission must carry (the test labels: datasets.test_labels)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from datasets.errors import DataError
from datasets.test_labels import read_id_csv


def open_search_data(best: dict, cache_dir: str | None):
    """The search's cache (reopened when still there, else rebuilt from its data_dir and slide map)."""
    from datasets.cache import open_cache, prepare_dataset

    cache_path = best.get("cache_path")
    if cache_path and Path(cache_path).is_dir() and cache_dir is None:
        try:
            cache = open_cache(cache_path)
        except DataError:
            cache = None  # a stale/partial cache: rebuild it below
        if cache is not None and cache.fingerprint == best.get("data_fingerprint", cache.fingerprint):
            return cache
    # The slide map the search used (None: the data dir's own slide_map.csv, if any): folds stay slide-grouped.
    cache = prepare_dataset(data_dir=best.get("data_dir"), cache_dir=cache_dir, progress=True,
                            slide_map=best.get("slide_map"))
    if best.get("data_fingerprint") and cache.fingerprint != best["data_fingerprint"]:
        print(f"warning: the data in {best.get('data_dir') or 'the synthetic set'} changed since the search "
              f"(fingerprint {cache.fingerprint[:12]} vs {best['data_fingerprint'][:12]}); refitting on the current data")
    return cache


def labelled_rows(cache) -> np.ndarray:
    """All rows with a label outside the test split: train + (PCam HDF5) valid."""
    rows = np.flatnonzero((cache.split != "test") & (cache.labels >= 0))
    if len(rows) == 0:
        raise DataError(f"the cache {cache.path} has no labelled train/valid rows: check the data dir {cache.source.get('data_dir')}")
    return rows


def expected_test_ids(cache, test_idx: np.ndarray) -> np.ndarray:
    """The ids the submission must carry: sample_submission.csv's, checked against the cache's test rows."""
    ids = cache.ids[test_idx].astype(str)
    data_dir = cache.source.get("data_dir")
    sample = Path(data_dir) / "sample_submission.csv" if data_dir else None
    if sample is None or not sample.is_file():
        return ids  # PCam HDF5: the test split's own order is the order
    want = read_id_csv(sample, "sample submission")["id"].astype(str).to_numpy()
    if len(want) != len(ids) or (want != ids).any():
        raise DataError(
            f"the cache's {len(ids)} test ids do not match the {len(want)} ids of {sample} in order: "
            f"rebuild the cache (delete {cache.path} and rerun)"
        )
    return want
