"""The driver-side Ray Tune callback that keeps one MLflow child run per trial (search.tracking says why
the driver logs, not the trials): created on a trial's start, per-epoch metrics and the objective so far
(best_val_auc, best_epoch: the runs table sorts as the leaderboard), retries, and the outcome."""
from __future__ import annotations

import time
from pathlib import Path

from ray.tune import Callback

from search.outcome import Outcome, decide, error_line
from search.report import EPOCH_METRICS, OBJECTIVE_METRICS, nodes_text
from search.tracking import (OUTCOME_TAG, PARENT_TAG, ROLE_TAG, TRIAL_ID_TAG, child_runs, client, experiment_id,
                             outcome_tags, params_of)


class MlflowTrialCallback(Callback):
    """Creates/continues one child run per trial under the parent, logging per-epoch metrics and the outcome."""

    def __init__(self, tracking_uri: str, experiment_name: str, parent_run_id: str, max_epochs: int):
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.parent_run_id = parent_run_id
        self.max_epochs = max_epochs
        self._reset()

    def _reset(self):
        self._mlf = None
        self._exp_id = None
        self._runs: dict[str, str] = {}  # trial_id -> child run id
        self._last_step: dict[str, int] = {}  # trial_id -> last epoch logged (resume: no double logging)
        self._nodes: dict[str, list[str]] = {}  # trial_id -> Ray nodes its epochs ran on (tag "nodes")

    # The callback is pickled into the Ray experiment state (tuner.pkl); the client is not picklable.
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def setup(self, **info):
        self._mlf = client(self.tracking_uri)
        self._exp_id = experiment_id(self._mlf, self.experiment_name)
        for trial_id, run in child_runs(self._mlf, self._exp_id, self.parent_run_id).items():
            self._runs[trial_id] = run.info.run_id
            hist = self._mlf.get_metric_history(run.info.run_id, "val_auc")
            self._last_step[trial_id] = max((m.step for m in hist), default=0)
            self._nodes[trial_id] = [n for n in run.data.tags.get("nodes", "").split(">") if n]

    def _child(self, trial) -> str:
        if trial.trial_id not in self._runs:
            config = trial.config
            run = self._mlf.create_run(
                self._exp_id, run_name=f"{trial.trial_id} {config.get('backbone', '')}".strip(),
                tags={PARENT_TAG: self.parent_run_id, TRIAL_ID_TAG: trial.trial_id, ROLE_TAG: "trial",
                      "backbone": str(config.get("backbone")), OUTCOME_TAG: "running"})
            self._mlf.log_batch(run.info.run_id, params=params_of(config))
            self._runs[trial.trial_id] = run.info.run_id
            self._last_step[trial.trial_id] = 0
        return self._runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        run_id = self._child(trial)
        self._mlf.update_run(run_id, status="RUNNING")
        self._mlf.set_tag(run_id, OUTCOME_TAG, "running")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric

        run_id = self._child(trial)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        if step <= self._last_step.get(trial.trial_id, 0):
            return  # re-run of an epoch after a resume: keep the first record of that step
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(result[k]), now, step) for k in EPOCH_METRICS + OBJECTIVE_METRICS
                   if isinstance(result.get(k), (int, float))]
        self._mlf.log_batch(run_id, metrics=metrics)
        self._last_step[trial.trial_id] = step
        nodes = self._nodes.setdefault(trial.trial_id, [])
        if result.get("node_id") and result["node_id"] not in nodes:
            nodes.append(result["node_id"])
            self._mlf.set_tag(run_id, "nodes", nodes_text(nodes))

    def on_trial_recover(self, iteration, trials, trial, **info):
        """The trial failed (e.g. its node died) and Ray retries it from its last checkpoint (FailureConfig)."""
        run_id = self._child(trial)
        self._mlf.set_tag(run_id, "retries", str(trial.num_failures))
        self._mlf.set_tag(run_id, "retried_after", error_line(_error_text(trial)))

    # While the search runs, a trial Ray completes ended by itself or by ASHA; a time-budget cut or Ctrl-C
    # never reaches these hooks (the driver settles those with reconcile_children at the end).
    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, decide(trial.last_result, self.max_epochs))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, decide(trial.last_result, self.max_epochs, error=_error_text(trial)))

    def _finish(self, trial, outcome: Outcome):
        run_id = self._child(trial)
        for k, v in outcome_tags(outcome).items():
            self._mlf.set_tag(run_id, k, v)
        self._mlf.set_terminated(run_id, outcome.mlflow_status)

    # No on_experiment_end: Ray marks every trial TERMINATED before calling it, so an interrupted trial cannot
    # be told from a finished one here. The driver settles the final statuses (reconcile_children).


def _error_text(trial) -> str:
    """The trial's error: the driver-local error.txt is written now, the copy in storage only on the next sync."""
    path = trial.error_file
    if path and Path(path).is_file():
        return Path(path).read_text()
    return trial.get_error() or "unknown error (see the trial's error.txt)"
