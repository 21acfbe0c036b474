"""Splits (stratified, slide-level, official) and the embedded synthetic generator's label rule."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from datasets.cache import PatchCache, prepare_dataset
from datasets.splits import folds_for, holdout_split, stratified_folds, train_val_split
from datasets.synthetic import CENTRE, generate, write_kaggle_layout

REPO = Path(__file__).resolve().parents[1]


def fake_cache(labels, groups=None, split=None) -> PatchCache:
    n = len(labels)
    return PatchCache(Path("."), np.zeros((n, 96, 96, 3), np.uint8), np.array([f"p{i}" for i in range(n)]),
                      np.asarray(labels, np.int8), np.array(split if split is not None else ["train"] * n),
                      None if groups is None else np.asarray(groups), "fp")


def test_stratified_split_is_seeded_and_balanced():
    labels = np.array([0] * 600 + [1] * 400)
    tr, va = train_val_split(fake_cache(labels), 0.2, seed=3)
    tr2, va2 = train_val_split(fake_cache(labels), 0.2, seed=3)
    assert np.array_equal(va, va2) and np.array_equal(tr, tr2)
    assert not np.array_equal(va, train_val_split(fake_cache(labels), 0.2, seed=4)[1])
    assert len(va) == 200 and labels[va].mean() == pytest.approx(0.4)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == 1000


def test_group_split_keeps_slides_apart():
    rng = np.random.default_rng(0)
    groups = np.array([f"s{g}" for g in rng.integers(0, 25, 1000)])
    labels = (rng.random(1000) < 0.4).astype(int)
    tr, va = train_val_split(fake_cache(labels, groups), 0.2, seed=1)
    assert set(groups[tr]).isdisjoint(groups[va])
    assert 0.12 < len(va) / 1000 < 0.3
    assert 0.25 < labels[va].mean() < 0.55


def test_official_valid_split_is_used():
    split = ["train"] * 8 + ["valid"] * 4 + ["test"] * 3
    tr, va = train_val_split(fake_cache([0, 1] * 7 + [0], split=split), 0.5, seed=0)
    assert list(tr) == list(range(8)) and list(va) == [8, 9, 10, 11]


def test_a_fraction_is_m_of_k_stratified_folds_the_refit_folds_policy():
    """One policy: a split's validation rows are the first m of K folds of stratified_folds (scikit-learn's
    StratifiedGroupKFold by slide, else StratifiedKFold), the splitter the refit's --folds use."""
    assert folds_for(0.2, 10) == (1, 5) and folds_for(0.1, 10) == (1, 10) and folds_for(0.3, 10) == (3, 10)
    assert folds_for(0.15, 10) == (1, 7) and folds_for(0.2, 3) == (1, 3)
    rng = np.random.default_rng(0)
    groups = np.array([f"s{g}" for g in rng.integers(0, 25, 1000)])
    labels = (rng.random(1000) < 0.4).astype(int)
    for g in (groups, None):
        _, va = train_val_split(fake_cache(labels, g), 0.2, seed=5)
        assert np.array_equal(va, stratified_folds(labels, g, 5, seed=5)[0][1])
    _, va = train_val_split(fake_cache(labels), 0.3, seed=0)
    assert len(va) == 300 and labels[va].mean() == pytest.approx(labels.mean(), abs=0.01)


def test_holdout_then_validation_by_slide_never_share_a_row_or_a_slide():
    rng = np.random.default_rng(1)
    groups = np.array([f"s{g}" for g in rng.integers(0, 40, 2000)])
    labels = (rng.random(2000) < 0.4).astype(int)
    cache = fake_cache(labels, groups)
    held = holdout_split(cache, 0.1, seed=0)
    tr, va = train_val_split(cache, 0.2, seed=0, exclude=held)
    assert 0.05 < len(held) / 2000 < 0.15 and len(np.intersect1d(held, np.concatenate([tr, va]))) == 0
    assert len(tr) + len(va) + len(held) == 2000
    sides = [set(groups[r]) for r in (held, tr, va)]
    assert all(a.isdisjoint(b) for i, a in enumerate(sides) for b in sides[i + 1:])
    assert np.array_equal(held, holdout_split(cache, 0.1, seed=0))  # seeded


def test_a_split_without_enough_of_a_class_or_slides_is_one_line():
    from datasets.errors import UserError
    with pytest.raises(UserError, match="every patch on one slide"):
        train_val_split(fake_cache([0, 1] * 10, ["s"] * 20), 0.2)
    with pytest.raises(UserError, match="only 1 labelled patch"):
        train_val_split(fake_cache([0] * 19 + [1]), 0.2)


def test_synthetic_label_rule_matches_tumour_masks():
    data = generate(n=400, seed=7)
    centre_hit = data.tumour_masks[:, CENTRE, CENTRE].any(axis=(1, 2))
    assert np.array_equal(data.labels == 1, centre_hit)
    neg = data.labels == 0
    ring_only = neg & data.tumour_masks.any(axis=(1, 2))
    assert ring_only.sum() / neg.sum() > 0.3, "a good share of negatives carry tumour cells in the outer ring"
    assert 0.32 < data.labels.mean() < 0.48


def test_synthetic_is_deterministic():
    a = generate(n=300, seed=1)  # its speed is a benchmark's (README), not a unit test's
    b = generate(n=300, seed=1)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, generate(n=300, seed=2).images)


def test_synthetic_stain_varies_per_slide():
    d = generate(n=600, seed=0)
    means = np.array([d.images[d.slides == s].reshape(-1, 3).mean(0) for s in np.unique(d.slides)])
    assert means.std(0).max() > 5, "pseudo-slides differ in colour"
    # H&E-like: red and blue dominate green on average (pink/purple tissue)
    m = d.images.reshape(-1, 3).mean(0)
    assert m[0] > m[1] and m[2] > m[1]


def test_synthetic_layout_loads_through_the_kaggle_loader(tmp_path):
    r = subprocess.run([sys.executable, "-m", "datasets.synthetic", "--out", str(tmp_path / "syn"), "--n", "200", "--seed", "0"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    cache = prepare_dataset(tmp_path / "syn", tmp_path / "c", progress=False)
    assert len(cache) == 200 and cache.groups is not None
    tr, va = train_val_split(cache, 0.2, seed=0)
    assert set(cache.groups[tr]).isdisjoint(cache.groups[va])
    data = generate(n=200, seed=0)
    labelled = cache.labels[cache.indices("train")]
    assert labelled.sum() <= data.labels.sum()


def test_default_dataset_is_synthetic(tmp_path):
    cache = prepare_dataset(None, tmp_path / "c", progress=False)
    assert cache.source["kind"] == "synthetic"
    assert len(cache) == 2000 and len(cache.indices("test")) > 0
