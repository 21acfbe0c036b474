"""Recovering the Kaggle patches' slides from a PCam release: on an HDF5 + meta release built from the real sample."""
from __future__ import annotations

import gzip
import shutil
import zlib

import numpy as np
import pandas as pd
import pytest

h5py = pytest.importorskip("h5py", reason="h5py (extra 'h5') not installed")

from datasets import slide_map  # noqa: E402
from datasets.cache import prepare_dataset  # noqa: E402
from datasets.splits import validation_kind  # noqa: E402


def slide_of(pid: str) -> str:
    return f"patient_{zlib.crc32(pid.encode()) % 40:03d}_node_0"


@pytest.fixture(scope="module")
def release(pcam_sample_dir, tmp_path_factory):
    """A PCam-style release holding the sample's train patches (shuffled over train/valid/test, plus test patches
    the Kaggle train set does not have), 12 of them re-encoded with small pixel changes and 10 left out."""
    tmp = tmp_path_factory.mktemp("release")
    cache = prepare_dataset(pcam_sample_dir, tmp / "cache", progress=False)
    train, test = cache.indices("train"), cache.indices("test")
    rng = np.random.default_rng(0)
    order = rng.permutation(train)
    left_out, near, kept = order[:10], order[10:22], order[10:]
    images = cache.images[kept].copy()
    noise = rng.integers(-1, 2, images[:12].shape)  # +-1 grey level: bytes differ, pixels do not (visibly)
    images[:12] = np.clip(images[:12].astype(int) + noise, 0, 255).astype(np.uint8)
    slides = [slide_of(str(cache.ids[r])) for r in kept]
    images = np.concatenate([images, cache.images[test[:100]]])  # PCam patches that Kaggle's train set lacks
    slides += [f"other_{i}" for i in range(100)]
    out = tmp / "pcam"
    out.mkdir()
    cuts = {"train": (0, 2000), "valid": (2000, 2600), "test": (2600, len(images))}
    for split, (a, b) in cuts.items():
        for key, arr in (("x", images[a:b]), ("y", np.zeros((b - a, 1, 1, 1), np.uint8))):
            with h5py.File(out / f"camelyonpatch_level_2_split_{split}_{key}.h5", "w") as f:
                f.create_dataset(key, data=arr)
        pd.DataFrame({"wsi": slides[a:b]}).to_csv(out / f"camelyonpatch_level_2_split_{split}_meta.csv")
    p = out / "camelyonpatch_level_2_split_valid_x.h5"  # as downloaded: gzipped
    with open(p, "rb") as src, gzip.open(str(p) + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    p.unlink()
    return cache, tmp, out, {str(cache.ids[r]) for r in left_out}, {str(cache.ids[r]) for r in near}


def test_slide_map_recovered_by_pixels(release, pcam_sample_dir, capsys):
    cache, tmp, pcam, left_out, near = release
    out = tmp / "slide_map.csv"
    assert slide_map.main(["--kaggle", str(pcam_sample_dir), "--pcam-h5", str(pcam), "--out", str(out),
                           "--cache-dir", str(tmp / "cache"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "3,200 Kaggle train patches: 3,178 matched exactly, 12 as near-duplicates, 10 unmatched" in printed
    got = pd.read_csv(out, dtype=str).set_index("id")["slide"]
    assert len(got) == 3200 and set(got.index) == set(cache.ids[cache.indices("train")])
    for pid, slide in got.items():
        assert slide == (f"unmatched:{pid}" if pid in left_out else slide_of(pid)), pid
    assert all(got[p] == slide_of(p) for p in near)
    # The map is what --slide-map takes: validation by slide.
    mapped = prepare_dataset(pcam_sample_dir, tmp / "cache", progress=False, slide_map=out)
    assert validation_kind(mapped) == "slide" and validation_kind(cache) == "patch"


def test_slide_map_needs_the_meta_csvs(release, pcam_sample_dir, tmp_path):
    from datasets.errors import DataError

    _, tmp, pcam, _, _ = release
    bare = tmp_path / "bare"
    shutil.copytree(pcam, bare)
    (bare / "camelyonpatch_level_2_split_test_meta.csv").unlink()
    with pytest.raises(DataError, match="split_test_meta.csv: not found; the slide of each PCam patch"):
        slide_map.build_slide_map(pcam_sample_dir, bare, cache_dir=tmp / "cache", progress=False)
