"""Every use of Ray's (and Optuna's) private parts, in one place; nothing else in pcam-tune touches them.

Each one is here because Ray 2.60 has no public way to do it:
- ``ResultGrid._experiment_analysis.trials``: the Trial objects behind a ResultGrid, in its order. A Result
  carries no trial status (finished or not), which the leaderboard's outcomes need; re-reading the experiment
  from storage with the public ExperimentAnalysis would cost a download on object stores and see Ray's
  clean-up (every trial TERMINATED), not the run's own state.
- ``Tuner._local_tuner.get_run_config()``: Tuner.restore takes no RunConfig, and the restored one carries the
  progress reporter pickled by the first run (old columns, old code).
- Ray's SIGINT handler read back after ``Tuner.fit``: fit returns normally after a Ctrl-C (state saved) and
  says nothing; Ray puts the previous handler back only when it caught one (tune.tune._setup_signal_catching).
- ``OptunaSearch._ot_trials``, ``._ot_study``, ``._completed_trials``: what search.searcher's feedback
  subclass must reach to tell Optuna the real outcome of a trial Ray withheld results from.
- Optuna's ``FrozenTrial._trial_id``: the storage id a ``optuna.trial.Trial`` needs to settle a RUNNING
  trial after the search.
- The text of Ray's warning "Failed to fetch metrics for N trial(s)" (ray.tune.analysis.experiment_analysis),
  which a time budget triggers for a trial it cut before its first result: the leaderboard already says so
  ("ended before its first epoch"), so that case is filtered out (``quiet_never_reported``); any other failure
  to read a trial's results still shows.

tests/test_private_api.py fails with a message naming the part when an upgrade renames or changes one.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal

OPTUNA_SEARCH_ATTRS = ("_ot_trials", "_ot_study", "_completed_trials")


def grid_trials(result_grid) -> list:
    """The ray.tune Trial objects of a ResultGrid, in the order of its results."""
    return result_grid._experiment_analysis.trials


def restored_run_config(tuner):
    """The RunConfig a restored Tuner will run with (None if this Ray keeps it elsewhere: nothing replaced)."""
    return getattr(getattr(tuner, "_local_tuner", None), "get_run_config", lambda: None)()


def fit_watching_ctrl_c(tuner):
    """Tuner.fit() with Ray's deletion of superseded checkpoints held back (keeping_checkpoints) and its warning
    about trials without results quieted (quiet_never_reported), and whether a Ctrl-C ended it. Ray swaps in its own SIGINT handler during fit, saves the
    state on the first Ctrl-C, returns normally, and puts the previous handler back only in that case: so
    finding our handler installed again afterwards means the search was interrupted. A second Ctrl-C (during
    Ray's saving, or with Ray's handler off) raises KeyboardInterrupt."""
    def second_ctrl_c(sig, frame):
        raise KeyboardInterrupt

    quiet_never_reported()
    previous = signal.signal(signal.SIGINT, second_ctrl_c)
    try:
        with keeping_checkpoints():
            grid = tuner.fit()
        ray_caught = signal.getsignal(signal.SIGINT) is second_ctrl_c and \
            os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") == "0"
    finally:
        signal.signal(signal.SIGINT, previous)
    return grid, ray_caught


RAY_ANALYSIS_LOGGER = "ray.tune.analysis.experiment_analysis"
NO_METRICS = "Failed to fetch metrics for"
NEVER_REPORTED = "both result.json and progress.csv were not found"


class NeverReportedFilter(logging.Filter):
    """Drops Ray's "Failed to fetch metrics" warning when every trial it names never reported (no result file):
    a trial the time budget cut before its first epoch, or one that failed before it; the leaderboard lists
    either with its status (and Ray reports the error itself)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(NO_METRICS):
            return True
        failures = message.splitlines()[1:]
        return not (failures and all(NEVER_REPORTED in line for line in failures))


def quiet_never_reported() -> None:
    """Install NeverReportedFilter on Ray's analysis logger (once per process)."""
    logger = logging.getLogger(RAY_ANALYSIS_LOGGER)
    if not any(isinstance(f, NeverReportedFilter) for f in logger.filters):
        logger.addFilter(NeverReportedFilter())


@contextlib.contextmanager
def keeping_checkpoints():
    """While the search runs, Ray's checkpoint manager deletes nothing (``_delete_fs_path`` of
    ray.train._internal.checkpoint_manager, which ``_CheckpointManager.register_checkpoint`` calls for checkpoints
    beyond ``num_to_keep``); search.tuner.prune_checkpoints deletes them once the search is over.

    Why: Ray deletes a superseded checkpoint the moment a better one is registered, but the experiment state that
    names the trial's latest checkpoint reaches the storage only with the next (forced, asynchronous) snapshot; a
    driver killed in between left --resume pointing at a deleted checkpoint ("Could not recover from checkpoint as
    it does not exist on storage anymore"). num_to_keep stays set because it is what makes Ray snapshot the state
    after every checkpoint, so a resume continues from the latest epoch."""
    from ray.train._internal import checkpoint_manager

    deleting = checkpoint_manager._delete_fs_path
    checkpoint_manager._delete_fs_path = lambda fs, fs_path: None
    try:
        yield
    finally:
        checkpoint_manager._delete_fs_path = deleting


def optuna_trials(search) -> dict:
    """OptunaSearch's Ray trial id -> optuna.trial.Trial it asked for."""
    return search._ot_trials


def optuna_study(search):
    return search._ot_study


def completed_trials(search) -> set:
    """Ray trial ids OptunaSearch has already told Optuna about."""
    return search._completed_trials


def live_trial(study, frozen):
    """An optuna.trial.Trial of ``study`` for a FrozenTrial still RUNNING in its storage (to report/tell it)."""
    import optuna

    return optuna.trial.Trial(study, frozen._trial_id)
