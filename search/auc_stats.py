"""How sure an AUC is: the one place the search, the holdout, the refit and the ensemble get their error bars.

- ``auc_interval``: a 95 % percentile bootstrap interval. With slides known it resamples whole slides (a cluster
  bootstrap): neighbouring patches of one slide are near-duplicates, so resampling patches would count one
  slide's tissue as many independent draws and give too narrow an interval.
- ``hanley_mcneil_se``: the standard error of an AUC from the AUC and the class counts alone (Hanley & McNeil
  1982). The leaderboard uses it for every trial's val AUC: all trials share one validation set, so it needs no
  predictions, and it is close to the bootstrap's for patch-level data (tests/test_auc_stats.py).

Each bootstrap resample is scored with a weighted Mann-Whitney count over the scores sorted once (ties count one
half, as in roc_auc_score), so 1,000 resamples of a few thousand patches take well under a second.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

LEVEL = 0.95
N_BOOT = 1000
MIN_UNITS = 5  # fewer slides (or patches) than this: no interval; resampling 2 slides says nothing
MIN_VALID = 0.9  # share of resamples that must keep both classes, else the interval is biased: none


class AucEstimate(NamedTuple):
    auc: float
    lo: float
    hi: float
    n: int
    by: str  # "slide" | "patch": what the bootstrap resampled
    units: int = 0  # how many slides (or patches) it resampled

    def text(self) -> str:
        """'0.9312 (95 % CI 0.9120-0.9480, ...)'; the same words in the terminal, the leaderboard and MLflow."""
        if math.isnan(self.auc):
            return "n/a (one class only)"
        if math.isnan(self.lo):
            return f"{self.auc:.4f} (no 95 % CI: {self.units} {self.by}(s), too few to resample)"
        return f"{self.auc:.4f} (95 % CI {self.lo:.4f}-{self.hi:.4f}, {self.by} bootstrap, n={self.n:,})"

    def metrics(self, prefix: str) -> dict[str, float]:
        """MLflow metrics: PREFIX, PREFIX_ci_low, PREFIX_ci_high."""
        return {prefix: self.auc, f"{prefix}_ci_low": self.lo, f"{prefix}_ci_high": self.hi}


def _weighted_auc(pos_w: np.ndarray, neg_w: np.ndarray) -> float:
    """AUC from per-unique-score weights of positives and negatives, scores ascending."""
    wp, wn = pos_w.sum(), neg_w.sum()
    if wp == 0 or wn == 0:
        return float("nan")
    below = np.cumsum(neg_w) - neg_w  # negative weight strictly below each score
    return float((pos_w * (below + 0.5 * neg_w)).sum() / (wp * wn))


def auc_interval(labels, probs, groups=None, n_boot: int = N_BOOT, seed: int = 0) -> AucEstimate:
    """AUC of ``probs`` against 0/1 ``labels`` with a 95 % bootstrap interval (whole ``groups`` resampled when
    given). NaN bounds when the data hold one class or every resample does."""
    labels = np.asarray(labels).astype(np.int64).ravel()
    probs = np.asarray(probs, dtype=np.float64).ravel()
    n = len(labels)
    _, inv = np.unique(probs, return_inverse=True)
    m = inv.max() + 1 if n else 0
    pos = labels == 1

    def auc_of(weights: np.ndarray) -> float:
        return _weighted_auc(np.bincount(inv, weights * pos, minlength=m), np.bincount(inv, weights * ~pos, minlength=m))

    groups = _known_groups(groups, n)
    point = auc_of(np.ones(n))
    by = "patch" if groups is None else "slide"
    if groups is not None:
        _, g_inv = np.unique(groups, return_inverse=True)
        n_groups = int(g_inv.max()) + 1
    units = n if groups is None else n_groups
    if math.isnan(point) or units < MIN_UNITS:
        return AucEstimate(point, math.nan, math.nan, n, by, units)
    rng = np.random.default_rng(seed)
    draws = np.empty(n_boot)
    for b in range(n_boot):
        if groups is None:
            w = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        else:
            w = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)[g_inv].astype(np.float64)
        draws[b] = auc_of(w)
    draws = draws[~np.isnan(draws)]
    if len(draws) < MIN_VALID * n_boot:  # many resamples lost a class (few slides hold it): no honest interval
        return AucEstimate(point, math.nan, math.nan, n, by, units)
    lo, hi = np.quantile(draws, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return AucEstimate(point, float(lo), float(hi), n, by, units)


def _known_groups(groups, n: int) -> np.ndarray | None:
    """Slide ids with each unmapped patch ('' in datasets' slide maps) its own cluster; None when none is known."""
    if groups is None:
        return None
    groups = np.asarray(groups).astype(str)
    unknown = groups == ""
    if unknown.all():
        return None
    return np.where(unknown, np.char.add("\0", np.arange(n).astype(str)), groups)


def hanley_mcneil_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUC from its value and the class counts (Hanley & McNeil 1982, eq. 2)."""
    if not (n_pos > 0 and n_neg > 0) or not math.isfinite(auc):
        return float("nan")
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


def within_one_se(values: list[float], se: float) -> int:
    """How many of ``values`` (ranked, the winner first) lie within one standard error of the winner's."""
    if not values or not math.isfinite(se):
        return 0
    return sum(1 for v in values if math.isfinite(v) and v >= values[0] - se)
