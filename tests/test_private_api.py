"""search/private_api.py is the one module touching Ray's and Optuna's private parts: each test here fails with
a message naming the part when an upgrade renames or changes it (update search/private_api.py then)."""
from __future__ import annotations

import os
import threading

import optuna
import pytest

from search import private_api

optuna.logging.set_verbosity(optuna.logging.WARNING)
UPDATE = "a Ray/Optuna upgrade changed it: update search/private_api.py"


def _tuner(storage, name: str, epoch_seconds: float = 0.0, epochs: int = 2):
    from ray import tune

    from tests.support.toy import toy_trainable

    return tune.Tuner(
        tune.with_resources(toy_trainable, {"cpu": 1}),
        param_space={"quality": tune.grid_search([0.2, 0.8]), "epochs": epochs, "epoch_seconds": epoch_seconds},
        tune_config=tune.TuneConfig(metric="best_val_auc", mode="max", max_concurrent_trials=2),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0))


def test_optuna_search_keeps_its_trials_study_and_completed_set():
    from ray.tune.search.optuna import OptunaSearch

    def define(trial):
        trial.suggest_float("x", 0.0, 1.0)

    search = OptunaSearch(space=define, metric="best_val_auc", mode="max")
    missing = [a for a in private_api.OPTUNA_SEARCH_ATTRS if not hasattr(search, a)]
    assert not missing, f"Ray's OptunaSearch no longer has {missing}: {UPDATE}"
    assert search.suggest("t1") is not None
    assert "t1" in private_api.optuna_trials(search), f"OptunaSearch._ot_trials no longer maps Ray trial ids: {UPDATE}"
    assert isinstance(private_api.optuna_study(search), optuna.Study), f"OptunaSearch._ot_study: {UPDATE}"
    assert isinstance(private_api.completed_trials(search), set), f"OptunaSearch._completed_trials: {UPDATE}"


def test_a_running_optuna_trial_can_be_settled_from_its_frozen_copy():
    study = optuna.create_study()
    asked = study.ask()
    (frozen,) = study.get_trials(deepcopy=False)
    assert hasattr(frozen, "_trial_id"), f"optuna FrozenTrial lost _trial_id: {UPDATE}"
    trial = private_api.live_trial(study, frozen)
    trial.report(0.7, 1)
    study.tell(trial, 0.7)
    assert study.trials[0].number == asked.number and study.trials[0].value == 0.7


def test_result_grid_trials_and_restored_run_config(ray_local, tmp_path):
    from ray import tune
    from ray.tune.experiment import Trial

    grid = _tuner(tmp_path, "grid").fit()
    trials = private_api.grid_trials(grid)
    assert all(isinstance(t, Trial) for t in trials), f"ResultGrid._experiment_analysis.trials: {UPDATE}"
    assert [t.config["quality"] for t in trials] == [r.config["quality"] for r in grid], \
        f"the ResultGrid's trials are no longer in the order of its results: {UPDATE}"
    assert {t.status for t in trials} == {Trial.TERMINATED}
    restored = tune.Tuner.restore(str(tmp_path / "grid"), trainable=_toy())
    run_config = private_api.restored_run_config(restored)
    assert isinstance(run_config, tune.RunConfig) and hasattr(run_config, "progress_reporter"), \
        f"Tuner._local_tuner.get_run_config() no longer gives the restored RunConfig: {UPDATE}"


def _toy():
    from tests.support.toy import toy_trainable

    return toy_trainable


def test_ctrl_c_is_told_from_a_finished_fit(ray_local, tmp_path):
    """Ray puts the previous SIGINT handler back only after catching a Ctrl-C: fit_watching_ctrl_c reads that."""
    grid, interrupted = private_api.fit_watching_ctrl_c(_tuner(tmp_path, "done"))
    assert not interrupted and len(grid) == 2
    # A Ctrl-C a few seconds in, while both trials sleep through their epochs.
    timer = threading.Timer(4.0, os.kill, (os.getpid(), private_api.signal.SIGINT))
    timer.start()
    try:
        grid, interrupted = private_api.fit_watching_ctrl_c(_tuner(tmp_path, "stopped", epoch_seconds=3.0, epochs=20))
    finally:
        timer.cancel()
    assert interrupted, f"Ray's SIGINT handling changed (tune.tune._setup_signal_catching): {UPDATE}"
    assert any(r.metrics.get("epoch", 0) < 20 for r in grid)


def test_ray_checkpoint_manager_deletes_through_the_function_keeping_checkpoints_holds_back():
    import inspect

    from ray.train._internal import checkpoint_manager

    assert callable(getattr(checkpoint_manager, "_delete_fs_path", None)), \
        f"ray.train._internal.checkpoint_manager._delete_fs_path is gone: {UPDATE}"
    source = inspect.getsource(checkpoint_manager._CheckpointManager.register_checkpoint)
    assert "_delete_fs_path(" in source, f"register_checkpoint no longer deletes through _delete_fs_path: {UPDATE}"
    with private_api.keeping_checkpoints():
        assert checkpoint_manager._delete_fs_path("fs", "path") is None
    assert checkpoint_manager._delete_fs_path is not None and "lambda" not in repr(checkpoint_manager._delete_fs_path)


def test_ray_warns_of_a_trial_without_results_in_the_words_the_filter_drops():
    """A time budget that cuts a trial before its first result (its actor still starting) leaves no result file,
    and Ray warns "Failed to fetch metrics"; NeverReportedFilter drops exactly that warning (the leaderboard
    says "ended before its first epoch"). The cut itself depends on timing, so Ray's words are read from its
    source, and the filter is run on a record built the way Ray builds it."""
    import inspect
    import logging

    from ray.tune.analysis import experiment_analysis

    assert experiment_analysis.logger.name == private_api.RAY_ANALYSIS_LOGGER, f"Ray's logger moved: {UPDATE}"
    fetch_all = inspect.getsource(experiment_analysis.ExperimentAnalysis._fetch_trial_dataframes)
    assert private_api.NO_METRICS in fetch_all, f"Ray's warning for unreadable results changed: {UPDATE}"
    fetch_one = inspect.getsource(experiment_analysis.ExperimentAnalysis._fetch_trial_dataframe)
    words = all(w in fetch_one for w in ("{EXPR_RESULT_FILE} and", "{EXPR_PROGRESS_FILE} were not found"))
    files = (experiment_analysis.EXPR_RESULT_FILE, experiment_analysis.EXPR_PROGRESS_FILE)
    assert words and f"both {files[0]} and {files[1]} were not found" == private_api.NEVER_REPORTED, \
        f"Ray's words for a trial without results changed: {UPDATE}"

    def record(failures: str) -> logging.LogRecord:
        return logging.LogRecord(private_api.RAY_ANALYSIS_LOGGER, logging.WARNING, __file__, 1,
                                 f"{private_api.NO_METRICS} 1 trial(s):\n{failures}", None, None)
    cut = record(f"- train_pcam_f3a28991: FileNotFoundError('Could not fetch metrics for train_pcam_f3a28991: "
                 f"{private_api.NEVER_REPORTED} at /r/ray/x/train_pcam_f3a28991_30')")
    assert not private_api.NeverReportedFilter().filter(cut)
    assert private_api.NeverReportedFilter().filter(record("- t: JSONDecodeError('bad line')")), \
        "another failure to read a trial's results must still show"
    assert private_api.NeverReportedFilter().filter(record("")) is True
    private_api.quiet_never_reported()
    private_api.quiet_never_reported()
    assert sum(isinstance(f, private_api.NeverReportedFilter) for f in experiment_analysis.logger.filters) == 1
