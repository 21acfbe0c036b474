"""What the refit trains (one network, K folds of one config, or the K best configs) and the model it ships.

A :class:`Member` is one network to train: a trial's config, whose learning-rate schedule spans the
trial's max epochs (``config["epochs"]``), stopped at the trial's best epoch, so the refit follows the
trajectory the search validated; trained on some labelled rows, optionally holding others out.

- ``--folds K``: K members of the best config on K folds of all labelled rows (slide-disjoint when the
  cache knows the slides, else stratified); each predicts the fold it did not train on, which gives the
  out-of-fold AUC: an estimate of the refit's quality that needs no test labels.
- ``--top-k K``: the K best distinct configs of the search, each on all labelled rows.

The shipped model (:class:`Ensemble`) averages its members' probabilities (each with its own
preprocessing and 8-view TTA). One member is saved in trainables' ``save_model`` format, several in
``pcam-tune-ensemble/1``: ``{"format", "members": [{"name", "config", "state_dict"}, ...]}``. Both are
plain tensors and containers, read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from datasets.errors import UserError
from datasets.files import atomic_path
from search.auc_stats import auc_interval

ENSEMBLE_FORMAT = "pcam-tune-ensemble/1"


# ---------------------------------------------------------------- members
@dataclass
class Member:
    name: str  # "refit", "fold 2/5", "rank 3 (trial 5bc4de46)"
    config: dict  # resolved trainables config; config["epochs"] = the schedule's horizon
    stop_epoch: int  # train epochs 1..stop_epoch of that schedule
    train_rows: np.ndarray  # cache rows it trains on
    held_out_rows: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # rows it predicts OOF
    trial_id: str | None = None
    search_val_auc: float | None = None


def member_config(config: dict, best_epoch: int, epochs: int | None, seed: int | None,
                  max_train_samples: int | None, where: str) -> tuple[dict, int]:
    """(config, stop epoch) that reproduce a trial: its schedule horizon, stopped at its best epoch.

    ``epochs`` (--epochs) moves the stop; past the horizon the horizon grows with it (a cosine schedule
    has no learning rate left after its end). The refit uses every labelled row unless
    ``max_train_samples`` says otherwise, whatever subsample the search used.
    """
    from trainables.train import resolve_config

    config = dict(config)
    stop = int(epochs or best_epoch)
    config["epochs"] = max(int(config.get("epochs") or stop), stop)
    config["max_train_samples"] = max_train_samples
    if seed is not None:
        config["seed"] = seed
    try:
        return resolve_config(config), stop
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def fold_members(base: Member, labels: np.ndarray, groups: np.ndarray | None, k: int) -> list[Member]:
    """K members of ``base``'s config, member i trained on every fold but fold i."""
    rows = np.asarray(base.train_rows)
    out = []
    for i, (train_pos, held_pos) in enumerate(fold_positions(labels, groups, k, int(base.config["seed"])), 1):
        out.append(Member(f"fold {i}/{k}", base.config, base.stop_epoch, rows[train_pos], rows[held_pos],
                          base.trial_id, base.search_val_auc))
    return out


def fold_positions(labels: np.ndarray, groups: np.ndarray | None, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Seeded stratified folds, slide-grouped (no slide in two folds) when ``groups`` is given: the split policy of
    datasets.splits.stratified_folds (the same as the search's train/validation and holdout splits)."""
    from datasets.splits import stratified_folds

    fewest = int(np.bincount(labels.astype(np.int64), minlength=2).min())
    if k < 2:
        raise UserError(f"--folds {k}: needs at least 2 folds")
    if k > fewest:
        raise UserError(f"--folds {k}: the labelled data holds only {fewest} patch(es) of one class; use --folds {max(2, fewest)} or fewer")
    if groups is not None:
        n_slides = len(np.unique(groups))
        if k > n_slides:
            raise UserError(f"--folds {k}: the slide map knows only {n_slides} slides and folds are by slide; "
                            f"use --folds {n_slides} or fewer")
    folds = stratified_folds(labels, groups, k, seed)
    for i, (tr, _) in enumerate(folds, 1):
        if len(np.unique(labels[tr])) < 2:
            raise UserError(f"--folds {k}: fold {i}'s training rows hold one class only; use fewer folds")
    return folds


def top_k_members(best: dict, k: int, make: Callable[[dict, int, str], tuple[dict, int]],
                  rows: np.ndarray) -> list[Member]:
    """The ``k`` best distinct configs of the search (ranked as its leaderboard), each on ``rows``."""
    if k < 2:
        raise UserError(f"--top-k {k}: an ensemble needs at least 2 configs (without --top-k the refit trains the best one)")
    trials = ranked_trials(best)
    members, seen = [], set()
    for t in trials:
        key = json.dumps(t["config"], sort_keys=True, default=str)
        if key in seen:
            continue  # the sampler proposed the same config twice: one network, not two copies of it
        seen.add(key)
        config, stop = make(t["config"], t["best_epoch"], f"trial {t['trial_id']} of search {best['name']!r}")
        members.append(Member(f"rank {t['rank']} (trial {t['trial_id']})", config, stop, rows,
                              trial_id=t["trial_id"], search_val_auc=t["best_val_auc"]))
        if len(members) == k:
            return members
    raise UserError(f"--top-k {k}: search {best['name']!r} has only {len(members)} distinct trial(s) with a val AUC "
                    f"(diverged and errored ones do not count); use --top-k {len(members)} or run more trials")


def ranked_trials(best: dict) -> list[dict]:
    """Usable trials best first: the order of the search's leaderboard.csv, full configs from its Ray experiment."""
    import pandas as pd

    board_path = Path(best["_path"]).with_name("leaderboard.csv")
    exp = best.get("experiment_path")
    if not board_path.is_file() or not exp or "://" in str(exp) or not Path(exp).is_dir():
        raise UserError(f"--top-k needs the search's {board_path.name} and its Ray experiment folder {exp} "
                        f"(they hold every trial's config); refit without --top-k, or rerun the search here")
    board = pd.read_csv(board_path, dtype={"trial_id": str})
    missing = {"trial_id", "best_val_auc", "best_epoch", "status"} - set(board.columns)
    if missing:
        raise UserError(f"{board_path} lacks column(s) {', '.join(sorted(missing))}: rerun the search")
    configs = trial_configs(exp)
    out = []
    for rank, row in enumerate(board.itertuples(index=False), 1):
        auc, status = float(row.best_val_auc), str(row.status)
        if math.isnan(auc) or not int(row.best_epoch) or status.startswith(("diverged", "errored", "out of GPU memory")):
            continue
        if row.trial_id not in configs:
            raise UserError(f"trial {row.trial_id} of {board_path} is not in the Ray experiment {exp}: "
                            f"rerun the search, or refit without --top-k")
        out.append({"rank": rank, "trial_id": row.trial_id, "best_val_auc": auc,
                    "best_epoch": int(row.best_epoch), "config": configs[row.trial_id]})
    return out


def trial_configs(experiment_path: str) -> dict[str, dict]:
    """trial_id -> full trial config, read from the experiment's files (no Ray cluster starts)."""
    from ray.tune import ExperimentAnalysis

    try:
        trials = ExperimentAnalysis(experiment_path).trials
    except Exception as e:  # a foreign/partial folder: say which, not a Ray traceback
        raise UserError(f"cannot read the Ray experiment {experiment_path} ({type(e).__name__}): "
                        f"refit without --top-k") from None
    return {t.trial_id: json.loads(json.dumps(dict(t.config), default=str)) for t in trials}


# ---------------------------------------------------------------- training members, out-of-fold
@dataclass
class Trained:
    member: Member
    net: object  # the trained network (anything predict accepts)
    held_out_probs: np.ndarray  # P(tumour) of member.held_out_rows, by a network that never trained on them
    test_probs: np.ndarray | None


def fit_members(members: list[Member], train: Callable[[Member], object],
                predict: Callable[[object, Member, np.ndarray], np.ndarray],
                test_rows: np.ndarray | None) -> list[Trained]:
    """Train each member on its own rows; predict the rows it held out and the test rows."""
    out = []
    for m in members:
        net = train(m)
        held = predict(net, m, m.held_out_rows) if len(m.held_out_rows) else np.empty(0, np.float32)
        test = predict(net, m, test_rows) if test_rows is not None and len(test_rows) else None
        out.append(Trained(m, net, held, test))
    return out


def out_of_fold(trained: list[Trained], labels_of: Callable[[np.ndarray], np.ndarray],
                groups_of: Callable[[np.ndarray], np.ndarray | None] = lambda rows: None) -> dict:
    """Each labelled row's prediction by the one member that held it out; pooled AUC with its 95 % bootstrap
    interval (whole slides resampled when ``groups_of`` knows them: search.auc_stats) and per-fold AUC.

    Raises if a row was held out twice or a member held out a row it trained on: the estimate is only
    honest when every prediction comes from a network that never saw the row.
    """
    from sklearn.metrics import roc_auc_score

    rows = np.concatenate([t.member.held_out_rows for t in trained])
    if len(np.unique(rows)) != len(rows):
        raise RuntimeError("a row is held out by two folds")
    for t in trained:
        if np.intersect1d(t.member.train_rows, t.member.held_out_rows).size:
            raise RuntimeError(f"{t.member.name} trained on rows it is scored on")
    probs = np.concatenate([t.held_out_probs for t in trained])
    fold = np.concatenate([np.full(len(t.member.held_out_rows), i) for i, t in enumerate(trained, 1)])
    order = np.argsort(rows)
    rows, probs, fold = rows[order], probs[order], fold[order]
    labels = labels_of(rows)
    fold_aucs = [float(roc_auc_score(labels[fold == i], probs[fold == i]))
                 if len(np.unique(labels[fold == i])) == 2 else None for i in range(1, len(trained) + 1)]
    est = auc_interval(labels, probs, groups_of(rows))
    return {"rows": rows, "fold": fold, "probs": probs, "labels": labels,
            "oof_auc": float(roc_auc_score(labels, probs)), "oof_estimate": est, "fold_aucs": fold_aucs}


def average(probs: list[np.ndarray]) -> np.ndarray:
    """The ensemble's probability: one member's own float32 output, else the float64 mean of the members'."""
    if len(probs) == 1:
        return probs[0]
    return np.mean(np.stack([np.asarray(p, dtype=np.float64) for p in probs]), axis=0)


# ---------------------------------------------------------------- the shipped model
class Ensemble:
    """Networks with their configs; predicts the average of their (TTA) probabilities."""

    def __init__(self, members: list[tuple[object, dict]], names: list[str] | None = None):
        self.members = members
        self.names = names or [f"member {i}" for i in range(1, len(members) + 1)]

    def predict_proba(self, images_u8: np.ndarray, tta: bool = True, batch_size: int | None = None) -> np.ndarray:
        from trainables.train import predict_proba

        return average([predict_proba(net, images_u8, cfg, tta=tta, batch_size=batch_size) for net, cfg in self.members])

    def save(self, path: Path) -> Path:
        """One member: trainables' save_model file; several: the ensemble format. Atomic either way."""
        import torch
        from trainables.train import resolve_config, save_model

        path = Path(path)
        if len(self.members) == 1:
            return save_model(path, *self.members[0])
        blob = {"format": ENSEMBLE_FORMAT,
                "members": [{"name": name, "config": dict(resolve_config(cfg)), "state_dict": net.state_dict()}
                            for name, (net, cfg) in zip(self.names, self.members)]}
        with atomic_path(path) as tmp:
            torch.save(blob, tmp)
        return path


def load_ensemble(path: str | os.PathLike, device=None) -> Ensemble:
    """An :class:`Ensemble` from a model file of either format (weights_only: no pickle), on ``device``
    (default: trainables' pick_device, a GPU when there is one)."""
    import torch
    from trainables.train import load_model, model_from_state, pick_device

    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {path} not found (train one with `python -m search.refit_best`)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors, truncated files
        raise UserError(f"{path} is not a pcam-tune model file ({type(e).__name__}): write one with "
                        f"`python -m search.refit_best`") from None
    if not (isinstance(blob, dict) and blob.get("format") == ENSEMBLE_FORMAT):
        return Ensemble([load_model(path, device)])
    device = device or pick_device()
    members = [(model_from_state(m["config"], m["state_dict"], device), m["config"]) for m in blob["members"]]
    return Ensemble(members, [m["name"] for m in blob["members"]])
