"""End-of-search outputs: trial summaries, the leaderboard, best_config.json and the PNG pictures.

Each trial's status is its `search.outcome.Outcome`, the same one its MLflow child run and the TPE feedback get.
The leaderboard ranks by search.outcome.rank_key, the one ranking rule (completed trials by objective, then early
ends by depth and objective, then trials without a trustworthy objective); best_config.json is its first row.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from datasets.files import atomic_write, write_atomically
from search import private_api
from search import outcome as outcomes
from search.outcome import OBJECTIVE, Outcome, decide

TOP_K = 10
# Per-epoch metrics the trainable reports (docs/architecture.md); logged to MLflow and plotted.
EPOCH_METRICS = ("val_auc", "val_loss", "val_acc", "train_loss", "lr", "epoch_seconds", "images_per_s")
# The objective so far and its epoch, logged every epoch too: the MLflow runs table then shows (and sorts by) the
# value the leaderboard ranks, not the last epoch's val_auc.
OBJECTIVE_METRICS = (OBJECTIVE, "best_epoch")


def unfinished_trials(experiment_path: str) -> set[str]:
    """Trials the search left unfinished (Ctrl-C, time budget), read from the experiment state Ray saved before
    its clean-up marks every trial TERMINATED in memory: these are the ones --resume continues."""
    from ray.tune import ExperimentAnalysis

    try:
        trials = ExperimentAnalysis(experiment_path).trials
    except Exception:  # no state (nothing ran): nothing to resume
        return set()
    return {t.trial_id for t in trials if t.status not in ("TERMINATED", "ERROR")}


@dataclass
class TrialSummary:
    trial_id: str
    config: dict
    outcome: Outcome
    best_val_auc: float
    best_epoch: int
    epochs_run: int
    history: pd.DataFrame  # one row per reported epoch
    checkpoint_path: str | None  # checkpoint of the best epoch (kept by CheckpointConfig)
    last_result: dict | None = None
    extra: dict = field(default_factory=dict)
    nodes: tuple[str, ...] = ()  # Ray node ids the trial's epochs ran on, in order (more than one: it moved)

    @property
    def status(self) -> str:
        return self.outcome.label

    @property
    def error(self) -> str:
        return self.outcome.error


def trial_nodes(history: pd.DataFrame) -> tuple[str, ...]:
    """The nodes a trial's epochs ran on, in order: one normally, two when its node died and it moved."""
    if "node_id" not in history.columns:
        return ()
    return tuple(dict.fromkeys(str(n) for n in history["node_id"].dropna()))


def nodes_text(nodes, short: bool = False) -> str:
    """'a>b': where a trial ran (leaderboard column, MLflow tag); short ids for the printed table."""
    return ">".join(n[:8] if short else n for n in nodes)


def _best_checkpoint_path(result, best_epoch: int) -> str | None:
    """The kept checkpoint of the best epoch (CheckpointConfig keeps the best by val_auc, plus the latest)."""
    best = [(ckpt, m) for ckpt, m in (result.best_checkpoints or []) if m.get("val_auc") is not None]
    if not best:
        return None
    for ckpt, m in best:
        if int(m.get("epoch", -1)) == best_epoch:
            return ckpt.path
    return max(best, key=lambda cm: cm[1]["val_auc"])[0].path


def summarize(result_grid, max_epochs: int, budget_hit: bool = False, interrupted: bool = False,
              unfinished: set[str] | None = None) -> list[TrialSummary]:
    """One summary per trial, best first. Trials that never reported rank last with AUC NaN."""
    from ray.tune.experiment import Trial

    from trainables.train import best_of

    # The Trial objects add the trial state (finished or not), which a Result alone does not carry.
    trials = private_api.grid_trials(result_grid)
    out = []
    for trial, result in zip(trials, result_grid):
        hist = result.metrics_dataframe
        if hist is None or "val_auc" not in getattr(hist, "columns", []):
            hist = pd.DataFrame(columns=["epoch", *EPOCH_METRICS])
        hist = hist.dropna(subset=["val_auc"]).drop_duplicates("training_iteration", keep="last") \
            if "training_iteration" in hist.columns else hist
        last = trial.last_result or None
        if last and OBJECTIVE in last:  # the objective as the trial reported it, i.e. as TPE and ASHA saw it
            best_auc, best_epoch = float(last[OBJECTIVE]), int(last.get("best_epoch", 0))
        else:
            best_auc, best_epoch = best_of(hist.to_dict("records"))
        finished = trial.status in (Trial.TERMINATED, Trial.ERROR) and trial.trial_id not in (unfinished or ())
        outcome = decide(last, max_epochs, error=result.error, finished=finished, budget_hit=budget_hit,
                         interrupted=interrupted)
        out.append(TrialSummary(
            trial_id=trial.trial_id, config=dict(trial.config), outcome=outcome, best_val_auc=best_auc,
            best_epoch=best_epoch, epochs_run=int(hist["epoch"].max()) if len(hist) else 0, history=hist,
            checkpoint_path=_best_checkpoint_path(result, best_epoch) if best_epoch else None, last_result=last,
            nodes=trial_nodes(hist)))
    out.sort(key=rank_key)
    return out


def rank_key(s: TrialSummary):
    """search.outcome.rank_key of a trial summary (the one ranking rule)."""
    return outcomes.rank_key(s.outcome, s.best_val_auc)


def winner(summaries: list[TrialSummary]) -> TrialSummary | None:
    """The search's pick: the first of ``summaries`` (sorted by rank_key) with a trustworthy objective."""
    first = summaries[0] if summaries else None
    return first if first is not None and rank_key(first)[0] < 2 else None


def varied_keys(summaries: list[TrialSummary]) -> list[str]:
    """Config keys that vary across trials: the ones worth a leaderboard column."""
    keys = sorted({k for s in summaries for k in s.config})
    return [k for k in keys if len({repr(s.config.get(k)) for s in summaries}) > 1] or ["backbone"]


def leaderboard(summaries: list[TrialSummary]) -> pd.DataFrame:
    keys = varied_keys(summaries)
    rows = []
    for rank, s in enumerate(summaries, 1):
        row = {"rank": rank, "trial_id": s.trial_id, "best_val_auc": round(s.best_val_auc, 4),
               "best_epoch": s.best_epoch, "epochs_run": s.epochs_run, "status": s.status,
               "stopped_at_rung": s.outcome.rung, "backbone": s.config.get("backbone")}
        if "val_auc_se" in s.extra:
            row["val_auc_se"] = round(s.extra["val_auc_se"], 4)
        if any("holdout" in x.extra for x in summaries):
            est = s.extra.get("holdout")
            row.update(holdout_auc=None if est is None else round(est.auc, 4),
                       holdout_ci_low=None if est is None else round(est.lo, 4),
                       holdout_ci_high=None if est is None else round(est.hi, 4))
        if any(x.nodes for x in summaries):
            row["nodes"] = nodes_text(s.nodes)
        for k in keys:
            v = s.config.get(k)
            row[k] = float(f"{v:.4g}") if isinstance(v, float) else v
        rows.append(row)
    board = pd.DataFrame(rows)
    if len(board):
        board["stopped_at_rung"] = board["stopped_at_rung"].astype("Int64")  # an epoch, or <NA>: not 1.0 / NaN
    return board


def format_leaderboard(board: pd.DataFrame, top_k: int = TOP_K) -> str:
    shown = board.head(top_k).copy()
    shown["status"] = shown["status"].str.slice(0, 60)
    if "holdout_auc" in shown.columns:  # one column: the estimate and its interval
        shown["holdout_auc"] = [("" if a is None or a != a else f"{a:.4f} [no CI]" if lo is None or lo != lo
                                 else f"{a:.4f} [{lo:.4f}-{hi:.4f}]")
                                for a, lo, hi in zip(shown["holdout_auc"], shown["holdout_ci_low"], shown["holdout_ci_high"])]
        shown = shown.drop(columns=["holdout_ci_low", "holdout_ci_high"])
    if "nodes" in shown.columns:  # where trials ran matters on a cluster only
        ids = {n for v in board["nodes"].dropna() for n in str(v).split(">") if n}
        if len(ids) > 1:
            shown["nodes"] = shown["nodes"].map(lambda v: nodes_text(str(v).split(">"), short=True))
        else:
            shown = shown.drop(columns="nodes")
    title = (f"Leaderboard (top {min(top_k, len(board))} of {len(board)} trials; ranked: completed first, then "
             f"deepest epoch, then best val_auc; holdout_auc with its 95 % interval)")
    return title + "\n" + shown.to_string(index=False)


def best_config_record(best: TrialSummary, **context) -> dict:
    """The best_config.json record (schema in docs/architecture.md; search.refit_best reads it)."""
    return {
        "name": context["name"], "space": context["space"], "config": _jsonable(best.config),
        "trial_id": best.trial_id, "objective": OBJECTIVE, "best_val_auc": best.best_val_auc,
        "best_epoch": best.best_epoch,
        "epochs_run": best.epochs_run, "status": best.status,
        "experiment_path": context["experiment_path"], "checkpoint_path": best.checkpoint_path,
        "data_dir": context["data_dir"], "slide_map": context.get("slide_map"),
        "validation": context.get("validation"), "cache_path": context["cache_path"],
        "data_fingerprint": context["data_fingerprint"], "tracking_uri": context["tracking_uri"],
        "mlflow_experiment": context["name"], "parent_run_id": context["parent_run_id"],
        "child_run_id": context.get("child_run_id"), "val_auc_se": best.extra.get("val_auc_se"),
        "holdout": context.get("holdout"),
    }


def _jsonable(config: dict) -> dict:
    return json.loads(json.dumps(config, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def write_json(path: Path, record: dict) -> None:
    """Atomic: readers (refit_best, a resume) never see half a file; a killed writer's temp is pid-marked."""
    write_atomically(path, json.dumps(record, indent=2) + "\n")


def roc_figure(labels, probs, label: str, title: str):
    """A ROC curve figure (closed, ready to save or log); shared by the search's and the refit's reports."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    fpr, tpr, _ = roc_curve(labels, probs)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"{label} (AUC {roc_auc_score(labels, probs):.4f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    plt.close(fig)
    return fig


def plot_roc(best: TrialSummary, out: Path) -> Path | None:
    """ROC curve of the best trial from its best checkpoint's val_predictions.npz (a folder or a URI)."""
    from search.storage import local_checkpoint

    if not best.checkpoint_path:
        return None
    with local_checkpoint(best.checkpoint_path) as folder:
        if not (folder / "val_predictions.npz").is_file():
            return None
        with np.load(folder / "val_predictions.npz") as f:
            labels, probs = f["labels"], f["probs"]
    if len(np.unique(labels)) < 2:
        return None
    fig = roc_figure(labels, probs, best.trial_id,
                     f"Best trial ROC, epoch {best.best_epoch} ({best.config.get('backbone')})")
    with atomic_write(out, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    return out


def plot_learning_curves(summaries: list[TrialSummary], out: Path) -> Path | None:
    """Left: val AUC per epoch of every trial (best in bold). Right: train/val loss of the best trial."""
    with_hist = [s for s in summaries if len(s.history)]
    if not with_hist:
        return None
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for s in reversed(with_hist):
        best = s is with_hist[0]
        ax1.plot(s.history["epoch"], s.history["val_auc"], marker="o", ms=3, lw=2.5 if best else 1,
                 alpha=1 if best else 0.5, label=f"{s.trial_id} (best)" if best else None)
    ax1.set(xlabel="epoch", ylabel="val AUC", title="Validation AUC per trial (ASHA stops show as short lines)")
    ax1.legend(loc="lower right")
    h = with_hist[0].history
    for key in ("train_loss", "val_loss"):
        if key in h:
            ax2.plot(h["epoch"], h[key], marker="o", label=key)
    ax2.set(xlabel="epoch", ylabel="loss", title=f"Best trial {with_hist[0].trial_id}")
    ax2.legend()
    fig.tight_layout()
    with atomic_write(out, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # the driver may have no display (a cluster head, CI)
    import matplotlib.pyplot as plt

    return plt
