"""The error bars every reported AUC carries (search.auc_stats), checked against scikit-learn and against the
spread of AUCs over genuinely independent samples."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from search.auc_stats import auc_interval, hanley_mcneil_se, within_one_se


def _scores(n, shift, rng):
    y = rng.integers(0, 2, n)
    return y, rng.normal(size=n) + shift * y


def test_point_estimate_is_roc_auc_score_ties_included():
    rng = np.random.default_rng(0)
    y, s = _scores(500, 1.0, rng)
    s = np.round(s, 1)  # many ties
    est = auc_interval(y, s, n_boot=200)
    assert est.auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert est.lo < est.auc < est.hi and est.by == "patch" and est.n == 500


def test_interval_covers_the_spread_of_independent_samples():
    """The 95 % interval's width is about the width of the AUCs of fresh samples of the same size."""
    rng = np.random.default_rng(1)
    fresh = [roc_auc_score(*_scores(400, 1.0, rng)) for _ in range(300)]
    spread = np.quantile(fresh, 0.975) - np.quantile(fresh, 0.025)
    y, s = _scores(400, 1.0, rng)
    est = auc_interval(y, s)
    assert 0.7 * spread < est.hi - est.lo < 1.4 * spread
    # Hanley-McNeil's SE is about a quarter of that width.
    se = hanley_mcneil_se(est.auc, int(y.sum()), int(len(y) - y.sum()))
    assert 0.7 * spread / 3.92 < se < 1.4 * spread / 3.92


def test_slide_bootstrap_is_wider_when_patches_of_a_slide_agree():
    """20 slides of 20 near-identical patches: 20 independent draws, not 400. Resampling patches would hide that."""
    rng = np.random.default_rng(2)
    slide_label = rng.integers(0, 2, 20)
    slide_score = rng.normal(size=20) + slide_label
    groups = np.repeat(np.arange(20), 20)
    y, s = slide_label[groups], slide_score[groups] + rng.normal(scale=0.01, size=400)
    by_patch, by_slide = auc_interval(y, s), auc_interval(y, s, groups=groups)
    assert by_slide.by == "slide" and by_slide.auc == by_patch.auc
    assert (by_slide.hi - by_slide.lo) > 2 * (by_patch.hi - by_patch.lo)


def test_one_class_or_too_few_slides_have_no_interval_and_say_why():
    est = auc_interval([1, 1, 1], [0.2, 0.5, 0.9])
    assert math.isnan(est.auc) and math.isnan(est.lo) and est.text() == "n/a (one class only)"
    rng = np.random.default_rng(4)
    y, s = _scores(60, 1.0, rng)
    two = auc_interval(y, s, groups=np.repeat(["a", "b"], 30))  # a 2-slide bootstrap is all-or-nothing: no CI
    assert math.isnan(two.lo) and two.units == 2 and "no 95 % CI: 2 slide(s)" in two.text()
    good = auc_interval([0, 1, 0, 1, 1, 0], [0.1, 0.8, 0.3, 0.7, 0.9, 0.2], n_boot=100)
    assert "95 % CI" in good.text() and set(good.metrics("holdout_auc")) == {
        "holdout_auc", "holdout_auc_ci_low", "holdout_auc_ci_high"}


def test_within_one_se_counts_the_winner_and_its_close_rivals():
    assert within_one_se([0.93, 0.925, 0.921, 0.90], 0.01) == 3
    assert within_one_se([0.93, 0.95, 0.80], 0.01) == 2  # a higher value (a stopped trial ranked lower) counts too
    assert within_one_se([0.93], float("nan")) == 0


def test_unmapped_patches_are_their_own_slides():
    """A slide map that misses some ids ('' in the cache) must not lump them into one giant slide."""
    rng = np.random.default_rng(3)
    y, s = _scores(300, 1.0, rng)
    groups = np.where(np.arange(300) < 150, (np.arange(300) // 10).astype(str), "")
    est, patch = auc_interval(y, s, groups=groups), auc_interval(y, s)
    assert est.by == "slide" and 0.5 < (est.hi - est.lo) / (patch.hi - patch.lo) < 2
    assert auc_interval(y, s, groups=np.full(300, "")).by == "patch"
