"""The official PCam HDF5 layout, on small files with the release's dataset names and shapes."""
from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest

h5py = pytest.importorskip("h5py", reason="h5py (extra 'h5') not installed")

from datasets.cache import prepare_dataset  # noqa: E402
from datasets.errors import DataError  # noqa: E402
from datasets.splits import train_val_split  # noqa: E402


def write_pcam(root, sizes=None, gz=False):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (sizes or {"train": 20, "valid": 8, "test": 6}).items():
        x = rng.integers(0, 255, (n, 96, 96, 3), dtype=np.uint8)
        y = (np.arange(n) % 2).astype(np.uint8).reshape(n, 1, 1, 1)
        for key, arr in (("x", x), ("y", y)):
            p = root / f"camelyonpatch_level_2_split_{split}_{key}.h5"
            with h5py.File(p, "w") as f:
                f.create_dataset(key, data=arr)
            if gz:
                with open(p, "rb") as src, gzip.open(str(p) + ".gz", "wb") as dst:
                    shutil.copyfileobj(src, dst)
                p.unlink()
    return root


@pytest.mark.parametrize("gz", [False, True])
def test_pcam_h5_official_split(tmp_path, gz):
    data = write_pcam(tmp_path / "pcam", gz=gz)
    cache = prepare_dataset(data, tmp_path / "c", progress=False)
    assert cache.source["kind"] == "pcam_h5"
    assert {k: v["n"] for k, v in cache.summary().items()} == {"train": 20, "valid": 8, "test": 6}
    assert (cache.labels[cache.indices("test")] >= 0).all(), "test labels are known in the PCam release"
    tr, va = train_val_split(cache, 0.2, seed=0)
    assert list(va) == list(cache.indices("valid"))
    if not gz:
        with h5py.File(data / "camelyonpatch_level_2_split_valid_x.h5") as f:
            assert np.array_equal(cache.images[cache.indices("valid")[3]], f["x"][3])


def test_pcam_h5_missing_y(tmp_path):
    data = write_pcam(tmp_path / "pcam")
    (data / "camelyonpatch_level_2_split_valid_y.h5").unlink()
    with pytest.raises(DataError, match="split_valid_y.h5: not found"):
        prepare_dataset(data, tmp_path / "c", progress=False)


def test_pcam_h5_wrong_shape(tmp_path):
    data = write_pcam(tmp_path / "pcam", sizes={"train": 4})
    with h5py.File(data / "camelyonpatch_level_2_split_train_x.h5", "w") as f:
        f.create_dataset("x", data=np.zeros((4, 64, 64, 3), np.uint8))
    with pytest.raises(DataError, match=r"expected uint8 \(N, 96, 96, 3\)"):
        prepare_dataset(data, tmp_path / "c", progress=False)


def test_pcam_h5_without_h5py_says_how_to_install(tmp_path, monkeypatch):
    data = write_pcam(tmp_path / "pcam", sizes={"train": 4})
    monkeypatch.setitem(__import__("sys").modules, "h5py", None)  # makes `import h5py` fail
    with pytest.raises(DataError, match=r"needs h5py: pip install 'pcam-tune\[h5\]'"):
        prepare_dataset(data, tmp_path / "c", progress=False)
