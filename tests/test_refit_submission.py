"""Submission files: validation, the atomic write (its temporaries: tests/test_datasets_files.py), test-label files."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from datasets.errors import DataError, UserError
from datasets.test_labels import read_test_labels
from search.refit import submission as sub

IDS = np.array(["b", "a", "c"])


def test_write_submission_round_trip(tmp_path):
    path = sub.write_submission(tmp_path / "s.csv", IDS, np.array([0.1, 0.9, 0.5], dtype=np.float32))
    df = pd.read_csv(path, dtype={"id": str})
    assert list(df.columns) == ["id", "label"]
    assert df["id"].tolist() == ["b", "a", "c"]  # order kept, not sorted
    np.testing.assert_allclose(df["label"], [0.1, 0.9, 0.5], rtol=1e-5)
    assert not list(tmp_path.glob(".*"))  # no temporary left


@pytest.mark.parametrize("ids, probs, match", [
    (["b", "c", "a"], [0.1, 0.2, 0.3], "row 3: id 'c' where sample_submission.csv has 'a'"),
    (["b", "a"], [0.1, 0.2], "2 rows, expected 3"),
    (["b", "a", "c"], [0.1, np.nan, 0.3], "row 3: label nan is not a probability"),
    (["b", "a", "c"], [0.1, 1.5, 0.3], "row 3: label 1.5 is not a probability"),
])
def test_invalid_submission_never_replaces_the_old_one(tmp_path, ids, probs, match):
    path = tmp_path / "s.csv"
    sub.write_submission(path, IDS, np.array([0.1, 0.2, 0.3]))
    before = path.read_bytes()
    with pytest.raises(UserError, match=match.replace("(", r"\(").replace(".", r"\.")):
        sub.write_submission(path, np.array(ids), np.array(probs), expected_ids=IDS)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*"))


def test_read_test_labels_orders_by_ids(tmp_path):
    f = tmp_path / "labels.csv"
    f.write_text("id,label\na,1\nb,0\nc,1\nextra,0\n")
    assert read_test_labels(f, IDS).tolist() == [0, 1, 1]


@pytest.mark.parametrize("text, match", [
    ("id,label\na,1\nb,0\n", r"no label for 1 of the 3 test ids \(e.g. c\)"),
    ("id,label\na,1\nb,2\nc,0\n", "row 3: label '2' is not 0 or 1"),
    ("id,y\na,1\n", "lacks column"),
    ("id,label\na,1\na,0\n", "id 'a' appears more than once"),
    ("", "not a readable CSV"),
])
def test_bad_test_labels_file(tmp_path, text, match):
    f = tmp_path / "labels.csv"
    f.write_text(text)
    with pytest.raises(DataError, match=match):
        read_test_labels(f, IDS)


def test_missing_test_labels_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_test_labels(tmp_path / "nope.csv", IDS)


def test_probabilities_are_written_exactly_so_nothing_ties(tmp_path):
    """Distinct float32 probabilities a hair apart near 0 and 1 stay distinct (%.6g made them tie) and read back exact."""
    near_one = np.nextafter(np.float32(1), np.float32(0))
    mid = np.float32(0.123456789)
    probs = np.array([1e-7, np.nextafter(np.float32(1e-7), np.float32(1)), mid, np.nextafter(mid, np.float32(1)),
                      near_one, np.nextafter(near_one, np.float32(0))], dtype=np.float32)
    ids = np.array([f"p{i}" for i in range(len(probs))])
    got = pd.read_csv(sub.write_submission(tmp_path / "s.csv", ids, probs))["label"].to_numpy()
    assert len(np.unique(probs)) == len(probs) == len(np.unique(got))
    np.testing.assert_array_equal(got.astype(np.float32), probs)
    means = probs.astype(np.float64) / 3  # an ensemble's float64 average keeps its own precision
    got = pd.read_csv(sub.write_submission(tmp_path / "e.csv", ids, means))["label"].to_numpy()
    np.testing.assert_array_equal(got, means)
