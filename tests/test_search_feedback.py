"""What TPE is told, checked against what a real Ray Tuner with ASHA actually delivers.

The trainable (tests.support.toy) reports a known AUC curve per config, so every value Optuna should hold is known.
Nothing here calls the searcher's hooks by hand: Ray decides the order (and, for the result at which ASHA stops
a trial, skips on_trial_result), and the persisted study is read back afterwards.
"""
from __future__ import annotations

import functools
import math

import optuna
import pytest

from search import report, searcher
from search.outcome import asha_rungs
from tests.support.toy import toy_auc

MAX_T, GRACE, RF = 4, 1, 2
RUNGS = asha_rungs(GRACE, RF, MAX_T)  # {1, 2}


def _define(trial, epoch_seconds=0.0, failures=True):
    # Trial 0 diverges at epoch 1, trial 1 raises at epoch 1 (before ASHA can stop them): both must reach Optuna
    # as FAIL.
    q = trial.suggest_float("quality", 0.0, 1.0)
    behaviour = {0: "diverge", 1: "raise"}.get(trial.number, "ok") if failures else "ok"
    return {"quality": q, "behaviour": behaviour, "at_epoch": 1, "epochs": MAX_T, "epoch_seconds": epoch_seconds}


def _run(tmp_path, name, num_samples, time_budget_s=None, epoch_seconds=0.0, feedback=True, failures=True):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from tests.support.toy import toy_trainable

    storage = f"sqlite:///{tmp_path}/optuna.db"
    define = functools.partial(_define, epoch_seconds=epoch_seconds, failures=failures)  # picklable: Ray saves the searcher
    alg = searcher.make_searcher(define, seed=0, num_samples=num_samples, max_t=MAX_T,
                                 feedback=feedback, storage_url=storage, study_name=name)
    tuner = tune.Tuner(
        tune.with_resources(toy_trainable, {"cpu": 1}),
        tune_config=tune.TuneConfig(
            metric="best_val_auc", mode="max", search_alg=alg, num_samples=num_samples, max_concurrent_trials=2,
            time_budget_s=time_budget_s,
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=MAX_T, grace_period=GRACE,
                                    reduction_factor=RF)),
        run_config=tune.RunConfig(name=name, storage_path=str(tmp_path / "ray"), verbose=0,
                                  callbacks=[searcher.SchedulerStopMarker(MAX_T)],
                                  failure_config=tune.FailureConfig(max_failures=0)))
    grid = tuner.fit()
    return grid, storage


@pytest.fixture(scope="module")
def asha_search(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("feedback")
    grid, storage = _run(tmp, "fb", num_samples=10)
    summaries = report.summarize(grid, MAX_T, unfinished=report.unfinished_trials(str(tmp / "ray" / "fb")))
    searcher.settle_study(storage, "fb", {s.trial_id: (s.outcome, s.last_result) for s in summaries})
    return summaries, searcher.load_study(storage, "fb")


def _by_ray_id(study):
    return {t.user_attrs[searcher.RAY_TRIAL_ID]: t for t in study.get_trials(deepcopy=False)}


def test_every_trial_has_the_state_of_its_outcome(asha_search):
    summaries, study = asha_search
    trials = _by_ray_id(study)
    assert len(trials) == len(summaries) == 10
    expected = {"completed": "COMPLETE", "stopped": "PRUNED", "diverged": "FAIL", "errored": "FAIL"}
    kinds = {s.outcome.kind for s in summaries}
    assert {"completed", "stopped", "diverged", "errored"} <= kinds, kinds  # ASHA stopped some, others finished
    for s in summaries:
        t = trials[s.trial_id]
        assert t.state.name == expected[s.outcome.kind], (s.trial_id, s.status, t.state)
        # The searcher's hook learns that a trial errored, not the error text (the leaderboard has it).
        assert t.user_attrs[searcher.OUTCOME_ATTR] == ("errored" if s.outcome.kind == "errored" else s.status)
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))


def test_stopped_trials_hold_their_value_at_the_rung_where_asha_stopped_them(asha_search):
    summaries, study = asha_search
    trials = _by_ray_id(study)
    stopped = [s for s in summaries if s.outcome.kind == "stopped"]
    assert stopped and {s.outcome.rung for s in stopped} <= RUNGS
    for s in stopped:
        t, q = trials[s.trial_id], s.config["quality"]
        rung = s.outcome.rung
        # Ray withheld this result from on_trial_result (ASHA's STOP): the feedback reported it on completion.
        assert max(t.intermediate_values) == rung
        assert math.isclose(t.intermediate_values[rung], toy_auc(q, rung), rel_tol=1e-9)
        assert sorted(t.intermediate_values) == list(range(1, rung + 1))
        # Optuna's value of a PRUNED trial is its last intermediate value: TPE orders it by depth, then value.
        assert math.isclose(t.value, toy_auc(q, rung), rel_tol=1e-9)


def test_completed_trials_hold_every_epoch_and_the_objective(asha_search):
    summaries, study = asha_search
    trials = _by_ray_id(study)
    for s in (s for s in summaries if s.outcome.kind == "completed"):
        t, q = trials[s.trial_id], s.config["quality"]
        assert sorted(t.intermediate_values) == list(range(1, MAX_T + 1))  # incl. the last (ASHA STOPs at max_t)
        assert math.isclose(t.value, toy_auc(q, MAX_T), rel_tol=1e-9) and math.isclose(t.value, s.best_val_auc)


def test_leaderboard_ranks_the_objective_and_puts_failures_last(asha_search):
    summaries, _ = asha_search
    assert [s.outcome.ranked for s in summaries] == sorted((s.outcome.ranked for s in summaries), reverse=True)
    ranked = [s for s in summaries if s.outcome.ranked]
    # search.outcome.rank_key: completed trials by objective, then early ends by depth, then objective.
    order = [(s.outcome.kind != "completed", -s.outcome.epoch, -s.best_val_auc) for s in ranked]
    assert order == sorted(order)
    board = report.leaderboard(summaries)
    stopped = board[board["status"].str.startswith("stopped by ASHA")]
    assert (stopped["stopped_at_rung"].astype(int) == stopped["epochs_run"]).all()
    assert board.iloc[-2:]["status"].str.match(r"^(diverged at epoch 1|errored: ValueError: toy trainable)").all()


def test_ray_still_withholds_the_stop_result_from_on_trial_result(ray_local, tmp_path):
    """The fact the feedback exists for, on Ray's stock OptunaSearch: ASHA STOPs every trial that reaches max_t,
    so no trial's last epoch reaches Optuna. If a Ray upgrade changes that, this fails: re-read
    TuneController._process_trial_result before simplifying searcher.py."""
    grid, storage = _run(tmp_path, "stock", num_samples=6, feedback=False)
    assert any(r.metrics.get("training_iteration") == MAX_T for r in grid)
    study = searcher.load_study(storage, "stock")
    assert not [t.number for t in study.trials if MAX_T in t.intermediate_values]


def test_time_budget_cut_trials_are_settled_not_left_running(ray_local, tmp_path):
    from ray.tune.experiment import Trial  # noqa: F401  (Ray's trial states are what summarize reads)

    # Two trials at once; epoch 1 is reported at once, every later epoch takes 60 s: a 25 s budget (counted from
    # the Tuner's start) cuts at least one of them after epoch 1 however long trial start-up takes on a busy
    # machine (up to ~25 s). ASHA continues the first trial to reach rung 1, so one is cut by the budget.
    grid, storage = _run(tmp_path, "budget", num_samples=2, time_budget_s=25, epoch_seconds=60.0, failures=False)
    summaries = report.summarize(grid, MAX_T, budget_hit=True,
                                 unfinished=report.unfinished_trials(str(tmp_path / "ray" / "budget")))
    searcher.settle_study(storage, "budget", {s.trial_id: (s.outcome, s.last_result) for s in summaries})
    study = searcher.load_study(storage, "budget")
    assert any(s.outcome.kind == "budget" for s in summaries), [s.status for s in summaries]
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    trials = _by_ray_id(study)
    for s in (s for s in summaries if s.outcome.kind == "budget"):
        t = trials[s.trial_id]
        assert t.state.name == "PRUNED" and max(t.intermediate_values) == s.outcome.epoch
        assert t.user_attrs[searcher.OUTCOME_ATTR].startswith("cut by time budget")
