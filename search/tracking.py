"""MLflow tracking of a search: one parent run per search, one child run per trial, from the driver.

Why a driver-side Tune callback and not MLflow calls inside the trainable: trials may run on other
nodes that cannot reach a sqlite store, the driver sees every trial's start, results, stop reason and
error (a trial that crashes cannot log its own crash), and a single writer keeps sqlite happy.

Resume safety: the parent is found again by the Ray experiment path it was created for, and children
by their `trial_id` tag, so restoring a search continues the same parent and never adds a second child
for a trial; epochs already logged are not logged twice.

This module is MLflow only (no Ray import: the refit reads its tags); the Tune callback that keeps the
children is search.trial_runs.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from search.outcome import Outcome

ROLE_TAG = "pcam_tune.role"
OUTCOME_TAG = "outcome"  # Outcome.label: how the trial ended
RUNG_TAG = "stopped_at_rung"  # the ASHA rung (epoch) that stopped it, on ASHA-stopped trials only
EXPERIMENT_PATH_TAG = "pcam_tune.experiment_path"
TRIAL_ID_TAG = "trial_id"
PARENT_TAG = "mlflow.parentRunId"


UI_ADDRESS = "http://127.0.0.1:5000"  # where ui_command (and `make ui`) serves


def ui_command(tracking_uri: str) -> str:
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"


# MLflow 3's UI shows an experiment as GenAI or model training by a per-browser switch that starts on GenAI
# (the `workflowType` URL parameter overrides it); the experiment kind tag alone does not flip it.
_MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def runs_url(exp_id: str, base: str = UI_ADDRESS) -> str:
    """The experiment's runs table: the parent run, its children nested under it."""
    return f"{base}/#/experiments/{exp_id}/runs?{_MODEL_TRAINING_VIEW}"


def curves_url(exp_id: str, run_ids: list[str], metric: str = "val_auc", base: str = UI_ADDRESS) -> str:
    """The compare view's metric page for these runs: one learning curve per run, x = step = epoch."""
    from urllib.parse import quote

    def js(value) -> str:
        return quote(json.dumps(value, separators=(",", ":")))

    return (f"{base}/#/metric?runs={js(run_ids)}&metric={js(metric)}&experiments={js([exp_id])}"
            f"&plot_metric_keys={js([metric])}&x_axis=step&show_point=true&{_MODEL_TRAINING_VIEW}")


def experiment_url(tracking_uri: str, experiment_name: str) -> str:
    """The runs table of an existing experiment, else the experiments list (for `make ui`)."""
    exp = client(tracking_uri).get_experiment_by_name(experiment_name)
    return runs_url(exp.experiment_id) if exp else f"{UI_ADDRESS}/#/experiments?{_MODEL_TRAINING_VIEW}"


def link_search_views(tracking_uri: str, experiment_name: str, parent_run_id: str) -> dict[str, str]:
    """{'runs': URL, 'curves': URL} of the search in the UI; the parent run's description links the curves too."""
    mlf = client(tracking_uri)
    exp_id = experiment_id(mlf, experiment_name)
    kids = sorted(child_runs(mlf, exp_id, parent_run_id).items())
    urls = {"runs": runs_url(exp_id), "curves": curves_url(exp_id, [run.info.run_id for _, run in kids])}
    # A root-relative link (/#/metric?...): it works whatever host and port the UI is served on.
    mlf.set_tag(parent_run_id, "mlflow.note.content",
                f"[Learning curves of the {len(kids)} trials side by side (val_auc per epoch)]"
                f"({curves_url(exp_id, [run.info.run_id for _, run in kids], base='')})")
    return urls


def client(tracking_uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import logging

    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial tables..." chatter

    return MlflowClient(tracking_uri=tracking_uri)


def artifact_location(tracking_uri: str, name: str) -> str | None:
    """A sqlite store keeps its artifacts beside it (``<dir>/mlartifacts/<name>``); MLflow's default would be
    ``./mlruns`` of whatever folder the command happened to run from."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts" / name).resolve().as_uri()
    return None


# MLflow 3's UI opens an experiment without this tag as a GenAI one (traces overview); a model-training
# experiment opens on its runs table. The key and value are the UI's ExperimentKind (mlflow.experimentKind).
EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"


def experiment_id(mlf, name: str) -> str:
    """The id of experiment ``name``, created (or restored, or tagged) as a model-training experiment."""
    exp = mlf.get_experiment_by_name(name)
    if exp is None:
        return mlf.create_experiment(name, artifact_location=artifact_location(mlf.tracking_uri, name),
                                     tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
    if exp.lifecycle_stage == "deleted":
        mlf.restore_experiment(exp.experiment_id)  # the user re-runs a name they deleted in the UI
    if EXPERIMENT_KIND_TAG not in exp.tags:  # made by an earlier version, or by hand; a kind the user set stays
        mlf.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return exp.experiment_id


def open_parent_run(tracking_uri: str, name: str, experiment_path: str, params: dict,
                    tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """(parent run id, resumed?): the parent of this Ray experiment if one exists, else a new one."""
    mlf = client(tracking_uri)
    exp_id = experiment_id(mlf, name)
    found = mlf.search_runs(
        [exp_id], filter_string=f"tags.{ROLE_TAG} = 'parent' and tags.`{EXPERIMENT_PATH_TAG}` = '{experiment_path}'",
        max_results=1, order_by=["attributes.start_time DESC"])
    if found:
        run_id = found[0].info.run_id
        mlf.update_run(run_id, status="RUNNING")
        return run_id, True
    run = mlf.create_run(exp_id, run_name=f"{name} (search)",
                         tags={ROLE_TAG: "parent", EXPERIMENT_PATH_TAG: experiment_path, **(tags or {})})
    mlf.log_batch(run.info.run_id, params=params_of(params))
    return run.info.run_id, False


def child_runs(mlf, exp_id: str, parent_run_id: str) -> dict[str, object]:
    """trial_id -> child Run, for every child of the parent (all pages)."""
    out, token = {}, None
    while True:
        page = mlf.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                               max_results=1000, page_token=token)
        for run in page:
            out[run.data.tags.get(TRIAL_ID_TAG)] = run
        token = page.token
        if not token:
            return out


def params_of(d: dict):
    from mlflow.entities import Param

    return [Param(str(k), str(v)[:6000]) for k, v in sorted(d.items())]


def outcome_tags(outcome: Outcome) -> dict[str, str]:
    tags = {OUTCOME_TAG: outcome.label}
    if outcome.rung is not None:
        tags[RUNG_TAG] = str(outcome.rung)
    if outcome.error:
        tags["error"] = outcome.error
    return tags


def reconcile_children(tracking_uri: str, experiment_name: str, parent_run_id: str,
                       outcomes: dict[str, Outcome]) -> None:
    """Give every child run the outcome the leaderboard shows (the callback cannot see budget cuts or Ctrl-C)."""
    mlf = client(tracking_uri)
    for trial_id, run in child_runs(mlf, experiment_id(mlf, experiment_name), parent_run_id).items():
        outcome = outcomes.get(trial_id)
        if outcome is None:
            continue
        for k, v in outcome_tags(outcome).items():
            if run.data.tags.get(k) != v:
                mlf.set_tag(run.info.run_id, k, v)
        if run.info.status != outcome.mlflow_status:
            mlf.set_terminated(run.info.run_id, outcome.mlflow_status)


def quiet_artifact_bars() -> None:
    """Off a terminal, no MLflow artifact download bar (datasets.progress says why bars stay off there)."""
    from datasets.progress import on_terminal

    if not on_terminal():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def finish_parent(tracking_uri: str, parent_run_id: str, *, metrics: dict, tags: dict, artifacts: list[Path],
                  status: str = "FINISHED", tables: dict | None = None) -> None:
    """Final metrics, tags, artifacts and ``tables`` ({"leaderboard.json": DataFrame}: MLflow's table artifacts,
    shown as tables in the UI's artifact view) of the parent run; then its status."""
    from mlflow.entities import Metric

    mlf = client(tracking_uri)
    now = int(time.time() * 1000)
    mlf.log_batch(parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    for file, table in (tables or {}).items():
        mlf.log_table(parent_run_id, data=table.astype(object).where(table.notna(), None), artifact_file=file)
    for k, v in tags.items():
        mlf.set_tag(parent_run_id, k, str(v))
    for path in artifacts:
        if path and Path(path).is_file():
            mlf.log_artifact(parent_run_id, str(path))
    mlf.set_terminated(parent_run_id, status)
