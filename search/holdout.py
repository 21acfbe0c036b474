"""The search's untouched holdout: patches no trial trained or validated on (`search.run --holdout FRACTION`,
drawn by datasets.splits.holdout_split), scored at the end with the best checkpoints of the top trials.

Why: a trial's best_val_auc is a maximum over epochs and over trials, on the validation patches that drove ASHA,
TPE and the choice of epoch, so the winner's figure is optimistic by construction. The holdout estimates how good
the chosen checkpoints are on data the choice never saw; it never selects (the winner is still the first row of
search.outcome.rank_key), so it stays an honest estimate. Scored with the refit's prediction (8-view TTA), with a
95 % bootstrap interval (search.auc_stats; whole slides resampled when slides are known).
"""
from __future__ import annotations

import numpy as np

from search.auc_stats import AucEstimate, auc_interval

DEFAULT_FRACTION = 0.1
DEFAULT_TOP = 3
# The default holdout is dropped (with a note) when it would hold fewer slides (patches without a slide map)
# than this: a figure about one or two slides is no estimate of anything. An explicit --holdout is kept, warned.
MIN_SLIDES, MIN_PATCHES = 3, 50
PREDICT_CHUNK = 4096  # rows decoded from the memmap at a time (57k full test set would be 1.6 GB)


def check_options(fraction: float | None, top: int) -> None:
    """--holdout / --holdout-top, checked before anything starts."""
    from datasets.errors import UserError

    if fraction is not None and not (fraction == 0 or 0 < fraction < 0.5):
        raise UserError(f"--holdout {fraction}: must be 0 (none) or a fraction below 0.5 (e.g. {DEFAULT_FRACTION})")
    if top < 1:
        raise UserError(f"--holdout-top {top}: must be at least 1")


def choose(cache, fraction: float | None, seed: int) -> tuple[float, np.ndarray, str | None]:
    """(fraction used, holdout rows, a note to print or None). ``fraction`` None = the default, dropped on data
    too small to spare a meaningful holdout."""
    from datasets.splits import holdout_split

    rows = holdout_split(cache, DEFAULT_FRACTION if fraction is None else fraction, seed)
    if not len(rows):
        return 0.0, rows, None
    slides = None if cache.groups is None else len(np.unique(cache.groups[rows]))
    small = slides < MIN_SLIDES if slides is not None else len(rows) < MIN_PATCHES
    size = f"{len(rows):,} patches" + (f" from {slides} slide(s)" if slides is not None else "")
    if small and fraction is None:
        return 0.0, rows[:0], (f"note: no holdout: the default {DEFAULT_FRACTION:g} of these data would be {size}, "
                               f"too few for an estimate; pass --holdout FRACTION to set one aside anyway")
    if small:
        return fraction, rows, f"warning: the holdout is {size}: its AUC describes little more than those"
    return DEFAULT_FRACTION if fraction is None else fraction, rows, None


def predict_cache_rows(model, cache, rows, config, tta: bool, batch_size: int | None) -> np.ndarray:
    """TTA probabilities of cache rows (held-out here; the refit's test rows too), read from the memmap a chunk at a time."""
    from datasets.progress import bar as progress_bar
    from trainables.train import predict_proba

    out = np.empty(len(rows), dtype=np.float32)
    with progress_bar(total=len(rows), desc="predict", unit="img", leave=False) as bar:
        for start in range(0, len(rows), PREDICT_CHUNK):
            chunk = rows[start:start + PREDICT_CHUNK]
            out[start:start + len(chunk)] = predict_proba(model, cache.images[chunk], config, tta=tta, batch_size=batch_size)
            bar.update(len(chunk))
    return out


def score_checkpoint(checkpoint_path: str, cache, rows: np.ndarray, tta: bool = True) -> np.ndarray:
    """P(tumour) of cache ``rows`` by the network in a trial's checkpoint (a folder or a storage URI)."""
    from search.storage import local_checkpoint
    from trainables.train import load_checkpoint_model

    with local_checkpoint(checkpoint_path) as folder:
        net, cfg, _ = load_checkpoint_model(folder)
    return predict_cache_rows(net, cache, rows, cfg, tta, None)


def score_top(summaries, cache, rows: np.ndarray, top: int, tta: bool = True,
              progress=print) -> dict[str, AucEstimate]:
    """{trial_id: holdout AUC with its interval} of the first ``top`` ranked trials that kept a checkpoint."""
    if not len(rows) or top < 1:
        return {}
    labels = cache.labels[rows]
    groups = None if cache.groups is None else cache.groups[rows]
    out = {}
    for s in summaries:
        if len(out) == top or not s.outcome.ranked:
            break
        if not s.checkpoint_path:
            continue
        probs = score_checkpoint(s.checkpoint_path, cache, rows, tta)
        out[s.trial_id] = auc_interval(labels, probs, groups)
        progress(f"holdout: trial {s.trial_id} (epoch {s.best_epoch}) AUC {out[s.trial_id].text()}")
    return out


def record(fraction: float, rows: np.ndarray, cache, estimate: AucEstimate | None) -> dict | None:
    """best_config.json's "holdout" entry (refit_best prints it next to its own figures)."""
    if not len(rows):
        return None
    number = lambda v: None if v is None or v != v else float(v)  # noqa: E731  (JSON: null, not NaN)
    return {"fraction": fraction, "n": int(len(rows)), "by": "slide" if cache.groups is not None else "patch",
            "auc": None if estimate is None else number(estimate.auc),
            "ci_low": None if estimate is None else number(estimate.lo),
            "ci_high": None if estimate is None else number(estimate.hi)}
