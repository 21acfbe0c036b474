"""Train/validation splits of a cache's labelled rows.

Random patch splits leak slides: neighbouring patches of one whole-slide image are near-duplicates,
so a patch-level split puts the same tissue on both sides and inflates validation AUC. When a
patch -> slide map is known the split is by slide; the official PCam split is used as it is.
"""
from __future__ import annotations

import numpy as np

from datasets.errors import UserError


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into ``labels``) of a seeded split with the class balance kept on both sides."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        pos = rng.permutation(np.flatnonzero(labels == c))
        val.append(pos[: max(1, int(round(len(pos) * val_fraction)))])
    val = np.sort(np.concatenate(val))
    return np.setdiff1d(np.arange(len(labels)), val), val


def group_split(labels: np.ndarray, groups: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of a seeded split in which no group (slide) is on both sides.

    Slides are dealt to validation in a seeded order, each time taking the slide that brings the
    validation positive rate closest to the overall one, until the validation share is reached.
    """
    slides, inverse = np.unique(groups, return_inverse=True)
    if len(slides) < 2:
        raise UserError(f"the slide map puts every patch on one slide ({slides[0]!r}); a slide-level split needs "
                        f"at least two slides (remove the slide map to split by patch)")
    n_per = np.bincount(inverse, minlength=len(slides))
    pos_per = np.bincount(inverse, weights=labels == 1, minlength=len(slides))
    target_n, target_rate = val_fraction * len(labels), (labels == 1).mean()
    order = list(np.random.default_rng(seed).permutation(len(slides)))
    chosen, n, pos = [], 0, 0.0
    while order and n < target_n and len(chosen) < len(slides) - 1:
        window = order[: max(1, min(len(order), 5))]  # a little greedy look-ahead, still seed-driven
        best = min(window, key=lambda s: abs((pos + pos_per[s]) / (n + n_per[s]) - target_rate))
        order.remove(best)
        chosen.append(best)
        n, pos = n + n_per[best], pos + pos_per[best]
    val = np.sort(np.flatnonzero(np.isin(inverse, chosen)))
    return np.setdiff1d(np.arange(len(labels)), val), val


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
    if cache.groups is not None:
        _, held = group_split(labels, cache.groups[rows], fraction, seed)
    else:
        _, held = stratified_split(labels, fraction, seed)
    if len(np.unique(labels[held])) < 2:
        raise UserError(f"--holdout {fraction}: the holdout ({len(held)} patches) lacks one class, so its AUC is "
                        f"undefined; use a larger fraction, or --holdout 0")
    return rows[held]


def train_val_split(cache, val_fraction: float = 0.2, seed: int = 0, use_groups: bool = True,
                    exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (into cache.images) of training and validation patches, none of them in ``exclude`` (the
    search's holdout).

    Official 'valid' split if the cache has one; else by slide when cache.groups is known; else stratified.
    """
    exclude = np.empty(0, dtype=np.int64) if exclude is None else np.asarray(exclude)
    valid = cache.indices("valid")
    if len(valid):
        return np.setdiff1d(cache.indices("train"), exclude), np.setdiff1d(valid, exclude)
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction {val_fraction}: must be between 0 and 1 (e.g. 0.2)")
    rows = np.setdiff1d(cache.indices("train"), exclude)
    labels = cache.labels[rows]
    if cache.groups is not None and use_groups:
        tr, va = group_split(labels, cache.groups[rows], val_fraction, seed)
    else:
        tr, va = stratified_split(labels, val_fraction, seed)
    if len(np.unique(labels[va])) < 2 or len(np.unique(labels[tr])) < 2:
        raise UserError(f"the validation split ({len(va)} patches) lacks one class, so AUC is undefined; "
                        f"use more data or a larger val_fraction")
    return rows[tr], rows[va]
