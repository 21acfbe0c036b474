"""Refit, step 4: its outputs, written into a version folder and published as one unit by swapping one symlink.

    results/NAME/
      refit-20260101-120000-4242/    model.pt, submission.csv, refit.json, oof.csv, test_roc_curve.png
      refit -> refit-20260101-120000-4242          the published version (os.replace of a symlink: atomic)
      model.pt -> refit/model.pt                   stable paths into whatever version is published
      submission.csv -> refit/submission.csv       ...

A refit writes a fresh version folder, then swaps ``refit`` to it in one rename. So model.pt and
submission.csv always come from the same refit: a kill before the swap leaves the previous pair
published (and an orphan folder the next run removes), a kill after it the new pair.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import os
import shutil
import time
from pathlib import Path

import numpy as np

from datasets.files import atomic_path, clean_stale_temps, fsync_path, pid_alive
from search.refit import submission as sub

CURRENT = "refit"
PREFIX = "refit-"
# Files a refit may write, reachable at results/NAME/<file> through the published version.
ENTRIES = ("model.pt", "submission.csv", "refit.json", "oof.csv", "test_roc_curve.png")

if TYPE_CHECKING:
    from search.refit.train import Fitted


def new_version(out_dir: Path) -> Path:
    """An empty version folder named by time and writer pid (the pid tells a killed writer's folder apart)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    version = out_dir / f"{PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    version.mkdir()
    return version


def published(out_dir: Path) -> Path | None:
    """The published version folder, or None before the first refit."""
    link = out_dir / CURRENT
    return link.resolve() if link.is_symlink() and link.exists() else None


def publish(out_dir: Path, version: Path) -> None:
    """Make ``version`` the published refit in one atomic rename, then drop the version it replaced."""
    for f in version.iterdir():
        if f.is_file():
            fsync_path(f)
    previous = published(out_dir)
    _swap_link(out_dir / CURRENT, version.name)
    _link_entries(out_dir, version)
    fsync_path(out_dir)  # a power cut must not undo the swap
    if previous is not None and previous != version.resolve():
        shutil.rmtree(previous, ignore_errors=True)


def discard(version: Path) -> None:
    """A refit that failed: its half-written version folder goes (the published one is untouched)."""
    shutil.rmtree(version, ignore_errors=True)


def clean_stale(out_dir: Path) -> list[Path]:
    """Remove version folders of killed refits (never published, writer gone); returns what was removed."""
    current, removed = published(out_dir), []
    for folder in out_dir.glob(f"{PREFIX}*"):
        if not folder.is_dir() or folder.is_symlink() or folder.resolve() == current:
            continue
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
            continue  # another refit of this search is writing it right now
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _swap_link(link: Path, target: str) -> None:
    with atomic_path(link) as tmp:
        os.symlink(target, tmp)


def _link_entries(out_dir: Path, version: Path) -> None:
    """results/NAME/<file> -> refit/<file> for the files this version has; stale entries go.

    Regular files (the layout before version folders) are removed together first, so a kill half-way
    leaves missing entries, never an old file beside a link to the new refit.
    """
    for name in ENTRIES:
        entry = out_dir / name
        if entry.exists() and not entry.is_symlink():
            entry.unlink()
    for name in ENTRIES:
        entry, target = out_dir / name, f"{CURRENT}/{name}"
        if not (version / name).exists():
            if entry.is_symlink():
                entry.unlink()
        elif not (entry.is_symlink() and os.readlink(entry) == target):
            _swap_link(entry, target)


def clean_killed_outputs(out_dir: Path) -> None:
    """What an interrupted refit left: its unpublished version folder, temporaries of the older flat layout."""
    if not out_dir.is_dir():
        return
    removed = clean_stale(out_dir) + clean_stale_temps(out_dir)  # version folders; a killed writer's temporaries
    for path in removed:
        print(f"removed {path.name}, left by an interrupted refit")


def write_outputs(version: Path, fitted: Fitted, cache, ids, summary) -> None:
    """model.pt, submission.csv (validated) and, for folds, oof.csv into the unpublished version folder."""
    fitted.ensemble.save(version / "model.pt")
    if ids is not None:
        sub.write_submission(version / "submission.csv", ids, fitted.probs)
        summary["submission"] = str(version.parent / "submission.csv")
    else:
        print("no test split in this data (no test/ + sample_submission.csv): wrote the model only")
    if fitted.oof is not None:
        write_oof(version / "oof.csv", fitted.oof, cache)
        summary["oof"] = str(version.parent / "oof.csv")


def write_oof(path: Path, oof: dict, cache) -> None:
    """id,label,fold[,slide],prob of every labelled patch, each scored by the fold model that never trained on it."""
    import pandas as pd

    table = {"id": cache.ids[oof["rows"]], "label": oof["labels"], "fold": oof["fold"]}
    if cache.groups is not None:
        table["slide"] = cache.groups[oof["rows"]]
    pd.DataFrame({**table, "prob": sub.exact_floats(oof["probs"])}).to_csv(path, index=False)
    folds = ", ".join("n/a" if a is None else f"{a:.4f}" for a in oof["fold_aucs"])
    print(f"out-of-fold AUC {oof['oof_estimate'].text()} on {len(oof['rows']):,} labelled patches (per fold: {folds}); "
          f"each patch scored by the one model that never trained on it")


def report_test_auc(labels, probs, labels_from, run, out_dir: Path, groups=None, holdout: dict | None = None):
    """Print the test AUC with its 95 % bootstrap interval (slides resampled when ``groups`` are known) and the
    search's holdout estimate beside it; save the ROC curve beside the submission and log both to MLflow.
    Returns the search.auc_stats.AucEstimate, or None with one class."""
    from search.auc_stats import auc_interval

    if len(np.unique(labels)) < 2:
        print(f"test labels from {labels_from} hold one class only: no AUC")
        return None
    est = auc_interval(labels, probs, groups)
    auc = est.auc
    print(f"test AUC {est.text()} (labels from {labels_from})")
    print(holdout_line(holdout))
    from search.report import roc_figure

    fig = roc_figure(labels, probs, "refit", "Test ROC")
    fig.savefig(out_dir / "test_roc_curve.png", dpi=100)
    if run is not None:
        import mlflow
        mlflow.log_metrics(est.metrics("test_auc"))
        mlflow.log_figure(fig, "test_roc_curve.png")
    return est


def holdout_line(holdout: dict | None) -> str:
    """The search's own estimate (best_config.json "holdout"), to read next to the refit's figures."""
    if not holdout or holdout.get("auc") is None:
        return "search holdout: none (the search ran with --holdout 0, or before holdouts existed)"
    lo, hi = holdout.get("ci_low"), holdout.get("ci_high")
    interval = "no 95 % CI: too few slides" if lo is None or lo != lo else f"95 % CI {lo:.4f}-{hi:.4f}"
    return (f"search holdout estimate of the chosen trial's checkpoint: AUC {holdout['auc']:.4f} ({interval}) on "
            f"{holdout['n']:,} patches no trial saw (the refit model trains on them too)")
