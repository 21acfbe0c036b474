"""Train/validation splits of a cache's labelled rows.

Random patch splits leak slides: neighbouring patches of one whole-slide image are near-duplicates,
so a patch-level split puts the same tissue on both sides and inflates validation AUC. When a
patch -> slide map is known the split is by slide; the official PCam split is used as it is.

One policy for every split (train/validation here, the search's holdout, the refit's folds in search.refit.ensemble):
``stratified_folds``, scikit-learn's StratifiedGroupKFold / StratifiedKFold; a fraction is m of its K folds
(``split_off``).
"""
from __future__ import annotations

import numpy as np

from datasets.errors import UserError


MAX_FOLDS = 10  # a fraction is taken as m of K folds, K <= MAX_FOLDS (see split_off)


def stratified_folds(labels: np.ndarray, groups: np.ndarray | None, k: int,
                     seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The one split policy of the project (train/validation, the search's holdout, the refit's ``--folds``):
    ``k`` seeded stratified folds, by slide when ``groups`` is given (no slide in two folds).

    scikit-learn's StratifiedGroupKFold (groups) or StratifiedKFold (no groups), ``shuffle=True,
    random_state=seed``: every row is held out by exactly one fold; StratifiedKFold keeps each fold's class
    counts within one of the overall share, StratifiedGroupKFold deals whole slides to the folds so that each
    fold's class balance comes as close to the overall one as whole slides allow (fold sizes follow the slides).
    Returns [(train positions, held positions)] into ``labels``, each sorted. Callers check k against the data.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if groups is None:
        splits = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(labels, labels)
    else:
        splits = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(labels, labels, groups)
    return [(np.sort(tr), np.sort(va)) for tr, va in splits]


def folds_for(fraction: float, most: int) -> tuple[int, int]:
    """(m, K): the share ``fraction`` as m of K folds, the closest with 2 <= K <= ``most`` (fewest K on a tie)."""
    return min(((m, k) for k in range(2, most + 1) for m in range(1, k)),
               key=lambda mk: (abs(mk[0] / mk[1] - fraction), mk[1]))


def split_off(labels: np.ndarray, groups: np.ndarray | None, fraction: float,
              seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into ``labels``) of (the rest, ``fraction`` held out): the first m of K stratified_folds.

    The held share is m/K, the closest to ``fraction`` with K <= MAX_FOLDS folds, no more folds than the rarer
    class has patches and, by slide, than there are slides: 0.2 is 1 of 5 folds, 0.1 1 of 10, 0.25 1 of 4,
    0.3 3 of 10, 0.15 1 of 7 (14.3 %). By slide the held share also follows the slides' sizes.
    """
    fewest = int(np.bincount(labels.astype(np.int64), minlength=2).min())
    most = min(MAX_FOLDS, fewest)
    if groups is not None:
        n_slides = len(np.unique(groups))
        if n_slides < 2:
            raise UserError(f"the slide map puts every patch on one slide ({groups[0]!r}); a slide-level split "
                            f"needs at least two slides (remove the slide map to split by patch)")
        most = min(most, n_slides)
    if most < 2:
        raise UserError(f"only {fewest} labelled patch(es) of one class: too few to split off a stratified "
                        f"{fraction:g}; use more data")
    m, k = folds_for(fraction, most)
    held = np.sort(np.concatenate([va for _, va in stratified_folds(labels, groups, k, seed)[:m]]))
    return np.setdiff1d(np.arange(len(labels)), held), held


def validation_kind(cache) -> str:
    """How train_val_split validates this cache: 'slide' (the official slide-disjoint PCam split, or by the
    slide map) or 'patch' (random patches: neighbours of one slide on both sides, so val AUC is optimistic)."""
    return "slide" if len(cache.indices("valid")) or cache.groups is not None else "patch"


PATCH_WARNING = ("warning: validation is by patch (no slide map): neighbouring patches of one slide land on both "
                 "sides, so val AUC is optimistic and the search favours configs that memorise; pass --slide-map CSV "
                 "(id,slide; python -m datasets.slide_map recovers it from the PCam release)")


def holdout_split(cache, fraction: float, seed: int = 0) -> np.ndarray:
    """Row indices of the search's untouched holdout: ``fraction`` of the 'train' rows, by slide when slides are
    known (no slide on both sides), else stratified by patch. No trial trains or validates on them
    (train_val_split's ``exclude``); the search scores its top trials on them at the end. Empty for 0."""
    if fraction == 0:
        return np.empty(0, dtype=np.int64)
    if not 0 < fraction < 0.5:
        raise UserError(f"--holdout {fraction}: must be 0 (no holdout) or a fraction below 0.5 (e.g. 0.1)")
    rows = cache.indices("train")
    labels = cache.labels[rows]
    _, held = split_off(labels, None if cache.groups is None else cache.groups[rows], fraction, seed)
    if len(np.unique(labels[held])) < 2:
        raise UserError(f"--holdout {fraction}: the holdout ({len(held)} patches) lacks one class, so its AUC is "
                        f"undefined; use a larger fraction, or --holdout 0")
    return rows[held]


def train_val_split(cache, val_fraction: float = 0.2, seed: int = 0, use_groups: bool = True,
                    exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (into cache.images) of training and validation patches, none of them in ``exclude`` (the
    search's holdout).

    Official 'valid' split if the cache has one (used as it is, less ``exclude``); else ``val_fraction`` split off
    by split_off (scikit-learn's stratified K-fold, by slide when cache.groups is known and ``use_groups``).
    """
    exclude = np.empty(0, dtype=np.int64) if exclude is None else np.asarray(exclude)
    valid = cache.indices("valid")
    if len(valid):
        return np.setdiff1d(cache.indices("train"), exclude), np.setdiff1d(valid, exclude)
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction {val_fraction}: must be between 0 and 1 (e.g. 0.2)")
    rows = np.setdiff1d(cache.indices("train"), exclude)
    labels = cache.labels[rows]
    tr, va = split_off(labels, cache.groups[rows] if cache.groups is not None and use_groups else None,
                       val_fraction, seed)
    if len(np.unique(labels[va])) < 2 or len(np.unique(labels[tr])) < 2:
        raise UserError(f"the validation split ({len(va)} patches) lacks one class, so AUC is undefined; "
                        f"use more data or a larger val_fraction")
    return rows[tr], rows[va]
