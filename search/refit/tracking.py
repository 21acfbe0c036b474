"""The refit's MLflow records: its run, the ensemble members' nested runs, the registered model.

The refit run sits in the search's experiment (tag pcam_tune.role=refit), with the trial config as
params and per-epoch metrics; an ensemble's members get nested runs (role refit-member). Runs of a
refit process that died (SIGKILL) are marked KILLED by the next refit.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from datasets.files import pid_alive
from datasets.defaults import default_tracking_uri, results_root
from search.refit.ensemble import Member
from search.tracking import ROLE_TAG  # "refit" / "refit-member" mark ours, beside the search's parent/trial

PID_TAG = "pcam_tune.pid"  # lets a later refit tell a killed run from a live one


def mlflow_uri() -> str:
    """The store the refit's run is in (read while the run is open: tracking_run restores the caller's on exit)."""
    import mlflow

    return mlflow.get_tracking_uri()


def epoch_reporter(epochs: int, log_to_mlflow: bool):
    """fit's on_epoch callback: a line per epoch on the console, the metrics into the active MLflow run
    (the refit's, or the member's nested run)."""
    def on_epoch(metrics: dict, state, predictions) -> None:
        epoch = int(metrics.get("epoch", 0))
        print(f"epoch {epoch}/{epochs}  train_loss {metrics.get('train_loss', float('nan')):.4f}  "
              f"lr {metrics.get('lr', float('nan')):.3g}  {metrics.get('epoch_seconds', 0):.1f}s  "
              f"{metrics.get('images_per_s', 0):.0f} img/s", flush=True)
        if log_to_mlflow:
            import mlflow
            numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "epoch"}
            mlflow.log_metrics(numeric, step=epoch)
    return on_epoch


class tracking_run:
    """Context manager: the refit's MLflow run (None with --no-mlflow), ended FAILED/KILLED on error."""

    def __init__(self, best, args, config, n_train, n_members):
        self.best, self.args, self.config, self.n_train, self.n_members = best, args, config, n_train, n_members
        self.run = None

    def __enter__(self):
        if self.args.no_mlflow:
            return None
        import mlflow
        from search.tracking import client, experiment_id

        # The search's store unless told otherwise: the refit run sits beside the trials it came from.
        uri = self.args.tracking_uri or self.best.get("tracking_uri") or default_tracking_uri(results_root(self.args.results_dir))
        # mlflow.set_tracking_uri also exports $MLFLOW_TRACKING_URI: put the caller's back on exit, so a later
        # search in the same process (a notebook, the tests) does not silently log into this store.
        self._caller_uri = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        exp_id = experiment_id(client(uri), self.best.get("mlflow_experiment") or self.best["name"])
        close_killed_refits(client(uri), exp_id)
        tags = {ROLE_TAG: "refit", PID_TAG: str(os.getpid()), "pcam_tune.search": self.best["name"],
                "pcam_tune.source_trial": str(self.best.get("trial_id")), "pcam_tune.refit_mode": refit_mode(self.args)}
        if self.best.get("child_run_id"):
            tags["pcam_tune.source_run_id"] = self.best["child_run_id"]
        self.run = mlflow.start_run(experiment_id=exp_id, run_name=f"{self.best['name']} (refit)", tags=tags)
        mlflow.log_params({**{k: "None" if v is None else v for k, v in self.config.items()},
                           "n_train": self.n_train, "tta": not self.args.no_tta, "refit_mode": refit_mode(self.args),
                           "members": self.n_members,
                           "search_best_val_auc": self.best.get("best_val_auc"),
                           "search_best_epoch": self.best.get("best_epoch")})
        print(f"MLflow: run {self.run.info.run_id} in experiment {self.best.get('mlflow_experiment') or self.best['name']!r} at {uri}")
        return self.run

    def __exit__(self, exc_type, exc, tb):
        if self.run is not None:
            import mlflow
            mlflow.end_run(run_status(exc_type))
            mlflow.set_tracking_uri(self._caller_uri)
        return False


def run_status(exc_type) -> str:
    return "FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED")


class member_run:
    """An ensemble member's nested MLflow run (its config, per-epoch metrics); None for a single refit or --no-mlflow."""

    def __init__(self, parent, member: Member, n_train: int, n_members: int):
        self.parent, self.member, self.n_train, self.n_members = parent, member, n_train, n_members
        self.run = None

    def __enter__(self):
        if self.parent is None or self.n_members == 1:
            return None
        import mlflow

        m = self.member
        tags = {ROLE_TAG: "refit-member", PID_TAG: str(os.getpid()), "pcam_tune.member": m.name,
                "pcam_tune.source_trial": str(m.trial_id)}
        self.run = mlflow.start_run(run_name=f"{self.parent.info.run_name} {m.name}", nested=True, tags=tags)
        mlflow.log_params({**{k: "None" if v is None else v for k, v in m.config.items()},
                           "n_train": self.n_train, "n_held_out": len(m.held_out_rows), "stop_epoch": m.stop_epoch})
        return self.run

    def __exit__(self, exc_type, exc, tb):
        if self.run is not None:
            import mlflow
            mlflow.end_run(run_status(exc_type))
        return False


def log_member_metrics(run, members: list[dict]) -> None:
    """Each member's held-out (fold) AUC and test AUC into its nested run, once every member is scored."""
    if run is None:
        return
    import mlflow

    for m in members:
        metrics = {k: v for k, v in (("held_out_auc", m["held_out_auc"]), ("test_auc", m["test_auc"])) if v is not None}
        if m["mlflow_run_id"] and metrics:
            for key, value in metrics.items():
                mlflow.MlflowClient().log_metric(m["mlflow_run_id"], key, value)


def close_killed_refits(mlf, exp_id: str) -> None:
    """Mark refit runs of dead processes (SIGKILL, power loss) KILLED, so the UI does not show them running."""
    for role in ("refit", "refit-member"):
        runs = mlf.search_runs([exp_id], filter_string=f"tags.`{ROLE_TAG}` = '{role}' and attributes.status = 'RUNNING'")
        for r in runs:
            pid = r.data.tags.get(PID_TAG, "")
            if not (pid.isdigit() and pid_alive(int(pid))):
                mlf.set_terminated(r.info.run_id, status="KILLED")


def log_outputs(best, cache, example_rows, out_dir: Path, summary) -> None:
    """The published submission, out-of-fold scores and model (registered as pcam-<name>) into the refit's run."""
    import mlflow
    from search.refit.registry import log_registered_model

    for name in ("submission.csv", "oof.csv"):
        if (out_dir / name).exists():
            mlflow.log_artifact(str((out_dir / name).resolve()))
    if summary.get("oof_auc") is not None:
        lo, hi = summary.get("oof_auc_ci") or (float("nan"), float("nan"))
        mlflow.log_metrics({"oof_auc": summary["oof_auc"], "oof_auc_ci_low": lo, "oof_auc_ci_high": hi})
    example = np.ascontiguousarray(cache.images[np.asarray(example_rows)[:4]])
    info = log_registered_model((out_dir / "model.pt").resolve(), f"pcam-{best['name']}", example)
    summary["registered_model"] = f"pcam-{best['name']}"
    summary["registered_version"] = getattr(info, "registered_model_version", None)
    summary["model_uri"] = info.model_uri
    mlflow.log_dict(summary, "refit.json")


def refit_mode(args) -> str:
    return "checkpoint" if args.from_checkpoint else f"folds={args.folds}" if args.folds else \
        f"top-k={args.top_k}" if args.top_k else "single"
