"""The official PCam HDF5 layout, on small files with the release's dataset names and shapes."""
from __future__ import annotations

import gzip
import shutil

import numpy as np
import pandas as pd
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


def write_meta(root, slides_per_split: dict[str, list[str]]):
    for split, wsi in slides_per_split.items():
        pd.DataFrame({"coord_y": range(len(wsi)), "coord_x": 0, "tumor_patch": False, "center_tumor_patch": False,
                      "wsi": wsi}).to_csv(root / f"camelyonpatch_level_2_split_{split}_meta.csv")


def test_pcam_meta_csvs_give_every_patch_its_slide(tmp_path):
    data = write_pcam(tmp_path / "pcam")
    slides = {s: [f"{s}_slide_{i % 3}" for i in range(n)] for s, n in {"train": 20, "valid": 8, "test": 6}.items()}
    without = prepare_dataset(data, tmp_path / "c", progress=False)
    assert without.groups is None
    write_meta(data, slides)
    cache = prepare_dataset(data, tmp_path / "c", progress=False)
    assert cache.fingerprint != without.fingerprint  # the slides are part of what the cache holds
    assert list(cache.groups) == slides["train"] + slides["valid"] + slides["test"]
    from datasets.splits import validation_kind

    assert validation_kind(cache) == validation_kind(without) == "slide"  # official split either way


def test_pcam_meta_csv_with_wrong_rows_or_missing_split_is_one_line(tmp_path):
    data = write_pcam(tmp_path / "pcam")
    write_meta(data, {"train": ["a"] * 19, "valid": ["b"] * 8, "test": ["c"] * 6})
    with pytest.raises(DataError, match=r"split_train_meta.csv: 19 rows but the train split has 20 patches"):
        prepare_dataset(data, tmp_path / "c", progress=False)
    write_meta(data, {"train": ["a"] * 20})
    (data / "camelyonpatch_level_2_split_valid_meta.csv").unlink()
    (data / "camelyonpatch_level_2_split_test_meta.csv").unlink()
    with pytest.raises(DataError, match="not for every split"):
        prepare_dataset(data, tmp_path / "c", progress=False)


def test_gzipped_images_are_not_ungzipped_again_when_the_cache_exists(tmp_path, monkeypatch):
    from datasets import pcam_h5

    data = write_pcam(tmp_path / "pcam", gz=True)
    first = prepare_dataset(data, tmp_path / "c", progress=False)
    opened = []
    real = pcam_h5._Opened.__enter__

    def spy(self):
        opened.append(self.path.name)
        return real(self)

    monkeypatch.setattr(pcam_h5._Opened, "__enter__", spy)
    again = prepare_dataset(data, tmp_path / "c", progress=False)
    assert again.path == first.path
    assert opened and not [n for n in opened if "_x.h5" in n], opened  # only the small label files were read
