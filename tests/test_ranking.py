"""One ranking rule (search.outcome.rank_key) for TPE, the leaderboard, best_config.json and the refit's pick,
checked on a real Ray Tuner + ASHA + persisted Optuna study in which an ASHA-stopped trial has a higher
best_val_auc than the only trial that completed its schedule."""
from __future__ import annotations

import contextlib
import io

import pytest

from search import error_bars, report, searcher
from search.refit import ensemble
from search.refit import find as refit_find
from search.outcome import Outcome, rank_key
from tests.support.toy import toy_auc

MAX_T = 4
# Run one at a time, in this order (toy curves: auc(q, e) = 0.5 + 0.45 q (1 - 0.6^e)):
#   0: q 0.3, completes (first at every rung: ASHA lets it through), best 0.6175 at epoch 4;
#   1, 2: q 1.0, 0.68 at rung 1, then diverge at epoch 2 (ranked last);
#   3: q 0.8, 0.644 at rung 1 < the rung's median 0.68 -> stopped by ASHA, yet above trial 0's 0.6175.
PLAN = {0: (0.3, "ok"), 1: (1.0, "diverge"), 2: (1.0, "diverge"), 3: (0.8, "ok")}


def _define(trial):
    trial.suggest_float("x", 0.0, 1.0)
    q, behaviour = PLAN[trial.number]
    return {"quality": q, "behaviour": behaviour, "at_epoch": 2, "epochs": MAX_T}


@pytest.fixture(scope="module")
def stopped_beats_completed(ray_local, tmp_path_factory):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from tests.support.toy import toy_trainable

    tmp = tmp_path_factory.mktemp("ranking")
    storage = f"sqlite:///{tmp}/optuna.db"
    alg = searcher.make_searcher(_define, seed=0, num_samples=4, max_t=MAX_T, storage_url=storage, study_name="rk")
    grid = tune.Tuner(
        tune.with_resources(toy_trainable, {"cpu": 1}),
        tune_config=tune.TuneConfig(metric="best_val_auc", mode="max", search_alg=alg, num_samples=4,
                                    max_concurrent_trials=1,
                                    scheduler=ASHAScheduler(time_attr="training_iteration", max_t=MAX_T,
                                                            grace_period=1, reduction_factor=2)),
        run_config=tune.RunConfig(name="rk", storage_path=str(tmp / "ray"), verbose=0,
                                  callbacks=[searcher.SchedulerStopMarker(MAX_T)])).fit()
    summaries = report.summarize(grid, MAX_T, unfinished=report.unfinished_trials(str(tmp / "ray" / "rk")))
    searcher.settle_study(storage, "rk", {s.trial_id: (s.outcome, s.last_result) for s in summaries})
    # What search.run.finish writes: the leaderboard and best_config.json of its winner.
    out = tmp / "results" / "rk"
    out.mkdir(parents=True)
    report.leaderboard(summaries).to_csv(out / "leaderboard.csv", index=False)
    record = report.best_config_record(
        report.winner(summaries), name="rk", space="toy", experiment_path=str(tmp / "ray" / "rk"), data_dir=None,
        cache_path="", data_fingerprint="", tracking_uri="", parent_run_id="")
    report.write_json(out / "best_config.json", record)
    return summaries, searcher.load_study(storage, "rk"), tmp / "results"


def test_the_search_had_a_stopped_trial_above_the_completed_one(stopped_beats_completed):
    summaries, _, _ = stopped_beats_completed
    by_q = {(s.config["quality"], s.config["behaviour"]): s for s in summaries}
    completed, stopped = by_q[(0.3, "ok")], by_q[(0.8, "ok")]
    assert completed.outcome.kind == "completed" and stopped.outcome.kind == "stopped"
    assert stopped.best_val_auc == pytest.approx(toy_auc(0.8, 1)) and completed.best_val_auc == pytest.approx(toy_auc(0.3, 4))
    assert stopped.best_val_auc > completed.best_val_auc


def test_tpe_leaderboard_best_config_and_refit_pick_the_same_trial(stopped_beats_completed):
    summaries, study, results = stopped_beats_completed
    completed = next(s for s in summaries if s.outcome.kind == "completed")
    tpe_best = study.best_trial.user_attrs[searcher.RAY_TRIAL_ID]
    board = report.leaderboard(summaries)
    picked = refit_find.find_best(results, "rk")
    top_k = ensemble.ranked_trials(picked)
    assert tpe_best == board["trial_id"][0] == picked["trial_id"] == top_k[0]["trial_id"] == completed.trial_id
    # The stopped trial comes second (depth before value), the diverged ones last.
    assert board["status"][1].startswith("stopped by ASHA at rung 1")
    assert board["status"][2:].str.startswith("diverged").all()
    assert study.metric_names == ["best_val_auc"]  # optuna-dashboard names the objective


def test_refit_cross_check_agrees_with_best_config(stopped_beats_completed):
    _, _, results = stopped_beats_completed
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        refit_find.find_best(results, "rk")
    assert "warning" not in printed.getvalue(), printed.getvalue()


def test_rank_key_tiers_are_the_states_tpe_is_told():
    kinds = ["completed", "stopped", "budget", "cut", "diverged", "errored", "silent"]
    for kind in kinds:
        o = Outcome(kind, epoch=2)
        assert o.optuna_state == ("COMPLETE", "PRUNED", "FAIL")[rank_key(o, 0.9)[0]]
    deep, shallow = Outcome("stopped", 3), Outcome("stopped", 1)
    assert sorted([(rank_key(shallow, 0.95), "shallow"), (rank_key(deep, 0.80), "deep"),
                   (rank_key(Outcome("completed", 4), 0.7), "completed"),
                   (rank_key(Outcome("diverged", 1), 0.99), "diverged")]) == [
        (rank_key(Outcome("completed", 4), 0.7), "completed"), (rank_key(deep, 0.80), "deep"),
        (rank_key(shallow, 0.95), "shallow"), (rank_key(Outcome("diverged", 1), 0.99), "diverged")]


def _summary(trial_id, kind, epoch, auc, se=0.01):
    import pandas as pd

    s = report.TrialSummary(trial_id, {"backbone": "baseline_bn"}, Outcome(kind, epoch), auc, epoch, epoch,
                            pd.DataFrame(), None)
    s.extra["val_auc_se"] = se
    return s


def test_close_call_line_names_the_trials_within_one_standard_error():
    summaries = sorted([_summary("a", "completed", 4, 0.930), _summary("b", "completed", 4, 0.925),
                        _summary("c", "stopped", 1, 0.935), _summary("d", "completed", 4, 0.90),
                        _summary("e", "diverged", 2, 0.99)], key=report.rank_key)
    assert [s.trial_id for s in summaries] == ["a", "b", "d", "c", "e"]
    line = error_bars.close_call(summaries, "demo")
    assert line.startswith("3 trials lie within one standard error (0.0100) of the winner's val AUC 0.9300")
    assert line.endswith("python -m search.refit_best --name demo --top-k 3") and "\n" not in line
    assert error_bars.close_call([_summary("a", "completed", 4, 0.93), _summary("d", "completed", 4, 0.90)], "x") is None
