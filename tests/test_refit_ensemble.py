"""search.refit.ensemble: folds by slide, an out-of-fold estimate that cannot leak, the averaged model."""
from __future__ import annotations

import numpy as np
import pytest

from datasets.errors import UserError
from search.refit.ensemble import Member, fit_members, fold_positions, out_of_fold


def _slides(n_slides: int = 12, per_slide: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"slide_{i:02d}" for i in range(n_slides)], per_slide)
    labels = (rng.random(len(groups)) < np.repeat(rng.uniform(0.1, 0.9, n_slides), per_slide)).astype(np.int8)
    return labels, groups


def test_folds_by_slide_are_slide_disjoint_and_cover_every_row_once():
    labels, groups = _slides()
    folds = fold_positions(labels, groups, 4, seed=0)
    held = np.concatenate([va for _, va in folds])
    assert sorted(held) == list(range(len(labels)))
    for tr, va in folds:
        assert not set(groups[tr]) & set(groups[va]) and not set(tr) & set(va)


def test_folds_without_slides_are_stratified():
    labels = np.array([0] * 60 + [1] * 40, dtype=np.int8)
    for tr, va in fold_positions(labels, None, 5, seed=1):
        assert len(va) == 20 and labels[va].sum() == 8  # 40 % positives in every fold


@pytest.mark.parametrize("k, groups, match", [
    (1, None, "at least 2 folds"),
    (13, "slides", "only 12 slides"),
    (50, None, "only 40 patch"),
])
def test_fold_errors(k, groups, match):
    _, slides = _slides()
    labels = np.array([0] * 80 + [1] * 40, dtype=np.int8)
    with pytest.raises(UserError, match=match):
        fold_positions(labels, slides if groups else None, k, seed=0)


class Memoriser:
    """A 'network' that knows the label of every row it trained on and guesses 0.5 (+ noise) elsewhere.

    An out-of-fold estimate that used it on a row it had seen would score near 1.0; an honest one scores
    about chance.
    """

    def __init__(self, rows, labels):
        self.known = dict(zip(rows.tolist(), labels[rows].tolist()))

    def predict(self, rows, rng):
        return np.array([self.known.get(r, 0.5 + 0.01 * rng.standard_normal()) for r in rows.tolist()])


def test_out_of_fold_auc_uses_only_models_that_never_saw_the_rows():
    labels, groups = _slides(n_slides=20)
    rows = np.arange(len(labels))
    members = [Member(f"fold {i}", {}, 1, rows[tr], rows[va]) for i, (tr, va) in enumerate(fold_positions(labels, groups, 5, 0), 1)]
    rng = np.random.default_rng(0)
    trained = fit_members(members, lambda m: Memoriser(m.train_rows, labels), lambda net, m, r: net.predict(r, rng),
                          test_rows=rows[:10])
    oof = out_of_fold(trained, lambda r: labels[r])
    assert np.array_equal(oof["rows"], rows) and np.array_equal(oof["labels"], labels)
    assert 0.3 < oof["oof_auc"] < 0.7  # chance: no fold model had seen its rows
    # the same members scored on rows they trained on: what a leaking estimate would report
    leaky = [m.net.predict(m.member.train_rows, rng) for m in trained]
    from sklearn.metrics import roc_auc_score
    assert roc_auc_score(labels[trained[0].member.train_rows], leaky[0]) == 1.0


def test_out_of_fold_refuses_a_member_scored_on_its_own_training_rows():
    labels, _ = _slides()
    rows = np.arange(len(labels))
    members = [Member("a", {}, 1, rows[:80], rows[60:]), Member("b", {}, 1, rows[60:], rows[:60])]
    trained = fit_members(members, lambda m: Memoriser(m.train_rows, labels), lambda net, m, r: net.predict(r, np.random.default_rng(0)),
                          test_rows=None)
    with pytest.raises(RuntimeError, match="trained on rows it is scored on"):
        out_of_fold(trained, lambda r: labels[r])
