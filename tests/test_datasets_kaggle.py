"""Every bad-input case of the Kaggle layout ends in one line naming the file/row and the fix."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets.cache import prepare_dataset
from datasets.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def _tif(path: Path, size=(96, 96), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path, format="TIFF")


def make_layout(root: Path, n_train=12, n_test=4) -> Path:
    """A small but complete Kaggle layout with random 96x96 patches."""
    (root / "train").mkdir(parents=True)
    rows = []
    for i in range(n_train):
        _tif(root / "train" / f"tr{i:03d}.tif", seed=i)
        rows.append(f"tr{i:03d},{i % 2}")
    (root / "train_labels.csv").write_text("id,label\n" + "\n".join(rows) + "\n")
    if not n_test:
        return root
    (root / "test").mkdir()
    for i in range(n_test):
        _tif(root / "test" / f"te{i:03d}.tif", seed=100 + i)
    (root / "sample_submission.csv").write_text("id,label\n" + "".join(f"te{i:03d},0\n" for i in range(n_test)))
    return root


@pytest.fixture
def layout(tmp_path):
    return make_layout(tmp_path / "data")


def expect(layout: Path, tmp_path: Path, *fragments: str):
    with pytest.raises(DataError) as e:
        prepare_dataset(layout, tmp_path / "cache", progress=False)
    msg = str(e.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_good_layout_loads(layout, tmp_path):
    cache = prepare_dataset(layout, tmp_path / "cache", progress=False)
    assert cache.images.shape == (16, 96, 96, 3)
    assert cache.summary()["train"] == {"n": 12, "pos": 6, "neg": 6, "unlabelled": 0}
    assert list(cache.ids[cache.indices("test")]) == [f"te{i:03d}" for i in range(4)]
    first = np.asarray(Image.open(layout / "train" / "tr000.tif").convert("RGB"))
    assert np.array_equal(cache.images[0], first)


def test_data_dir_missing(tmp_path):
    expect(tmp_path / "nowhere", tmp_path, "nowhere", "not found", "--data-dir")


def test_labels_csv_missing(layout, tmp_path):
    (layout / "train_labels.csv").unlink()
    expect(layout, tmp_path, "train_labels.csv", "not found")


def test_labels_csv_empty(layout, tmp_path):
    (layout / "train_labels.csv").write_text("")
    expect(layout, tmp_path, "train_labels.csv", "empty")


def test_labels_csv_missing_column(layout, tmp_path):
    (layout / "train_labels.csv").write_text("id,target\ntr000,1\n")
    expect(layout, tmp_path, "train_labels.csv", "missing column", "'label'", "id,label")


def test_label_not_binary(layout, tmp_path):
    p = layout / "train_labels.csv"
    p.write_text(p.read_text().replace("tr003,1", "tr003,2"))
    expect(layout, tmp_path, "train_labels.csv line 5", "'2'", "not 0 or 1")


def test_duplicate_ids(layout, tmp_path):
    p = layout / "train_labels.csv"
    p.write_text(p.read_text() + "tr001,1\n")
    expect(layout, tmp_path, "duplicate id 'tr001'", "first at line 3")


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/b", ".hidden"])
def test_unsafe_ids(layout, tmp_path, bad):
    p = layout / "train_labels.csv"
    p.write_text(p.read_text() + f"{bad},1\n")
    expect(layout, tmp_path, repr(bad), "not a safe file name")


def test_listed_image_missing(layout, tmp_path):
    (layout / "train" / "tr004.tif").unlink()
    expect(layout, tmp_path, "tr004.tif", "listed in train_labels.csv", "missing")


def test_corrupt_tif(layout, tmp_path):
    (layout / "train" / "tr005.tif").write_bytes(b"II*\x00garbage" * 10)
    expect(layout, tmp_path, "tr005.tif", "unreadable or corrupt")


def test_wrong_size(layout, tmp_path):
    _tif(layout / "train" / "tr006.tif", size=(64, 80))
    expect(layout, tmp_path, "tr006.tif", "64x80", "expected 96x96")


def test_not_rgb_convertible(layout, tmp_path):
    Image.fromarray(np.zeros((96, 96), np.float32), mode="F").save(layout / "train" / "tr007.tif")
    expect(layout, tmp_path, "tr007.tif", "cannot be converted to RGB")


def test_grey_and_rgba_are_converted(layout, tmp_path):
    _tif(layout / "train" / "tr008.tif", mode="L")
    _tif(layout / "train" / "tr009.tif", mode="RGBA")
    cache = prepare_dataset(layout, tmp_path / "cache", progress=False)
    assert cache.images.shape[-1] == 3


def test_single_class(layout, tmp_path):
    p = layout / "train_labels.csv"
    p.write_text("id,label\n" + "".join(f"tr{i:03d},0\n" for i in range(12)))
    expect(layout, tmp_path, "every label is 0", "both classes")


def test_test_folder_disagrees_with_submission(layout, tmp_path):
    _tif(layout / "test" / "stray.tif")
    expect(layout, tmp_path, "disagrees with sample_submission.csv", "'stray'")
    (layout / "test" / "stray.tif").unlink()
    (layout / "test" / "te002.tif").unlink()
    expect(layout, tmp_path, "'te002'", "have no tif")


def test_slide_map_missing_ids(layout, tmp_path):
    (layout / "slide_map.csv").write_text("id,slide\ntr000,s1\n")
    expect(layout, tmp_path, "slide_map.csv", "11 train id(s) have no slide")


@pytest.mark.parametrize("case", ["missing_dir", "bad_label"])
def test_cli_one_line_no_traceback(layout, tmp_path, case):
    if case == "bad_label":
        p = layout / "train_labels.csv"
        p.write_text(p.read_text().replace("tr003,1", "tr003,yes"))
        data = layout
    else:
        data = tmp_path / "missing"
    r = subprocess.run([sys.executable, "-m", "datasets.prepare", "--data-dir", str(data), "--cache-dir", str(tmp_path / "c")],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
