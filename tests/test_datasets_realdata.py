"""The real Kaggle PCam sample (../shared/pcam_sample) through the same loader and cache."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from datasets.cache import prepare_dataset
from datasets.splits import train_val_split

REPO = Path(__file__).resolve().parents[1]


def test_real_sample_loads_and_caches(pcam_sample_dir, tmp_path):
    cache = prepare_dataset(pcam_sample_dir, tmp_path / "c", progress=False)
    s = cache.summary()
    labels = np.loadtxt(pcam_sample_dir / "train_labels.csv", delimiter=",", skiprows=1, usecols=1, dtype=int)
    assert s["train"] == {"n": 3200, "pos": int(labels.sum()), "neg": int((labels == 0).sum()), "unlabelled": 0}
    assert s["test"]["n"] == 800
    sub_ids = [line.split(",")[0] for line in (pcam_sample_dir / "sample_submission.csv").read_text().split()[1:]]
    assert list(cache.ids[cache.indices("test")]) == sub_ids
    k = 1234
    pixels = np.asarray(Image.open(pcam_sample_dir / "train" / f"{cache.ids[k]}.tif").convert("RGB"))
    assert np.array_equal(cache.images[k], pixels)
    tr, va = train_val_split(cache, 0.2, seed=0)
    assert len(va) == 640 and abs(cache.labels[va].mean() - labels.mean()) < 0.01


def test_prepare_cli_reports_counts(pcam_sample_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "datasets.prepare", "--data-dir", str(pcam_sample_dir),
                        "--cache-dir", str(tmp_path / "c"), "--quiet"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "train: 3,200 images (1,301 positive / 1,899 negative)" in r.stdout
    assert "test : 800 images" in r.stdout
