"""Use the whole budget, start from what is known: a time budget without --num-samples keeps proposing trials, and
--warm-start starts TPE from an earlier search's persisted study (real searches, real Optuna sqlite storage)."""
from __future__ import annotations

import contextlib
import io
import time

import optuna
import pandas as pd
import pytest

from datasets.errors import UserError
from search import run as search_run
from search import searcher
from search.spaces import SpaceOptions, define_by_run, get_space, start_points

BUDGET_S = 15


@pytest.fixture(scope="module")
def searches(ray_local, tmp_path_factory):
    from datasets.synthetic import write_kaggle_layout

    tmp = tmp_path_factory.mktemp("warm")
    data_a, data_b = tmp / "a", tmp / "b"
    write_kaggle_layout(data_a, n=240, seed=0)
    write_kaggle_layout(data_b, n=240, seed=1)
    results = tmp / "results"
    common = ["--space", "smoke", "--max-epochs", "1", "--results-dir", str(results), "--cache-dir", str(tmp / "cache"),
              "--cpus-per-trial", "1", "--max-concurrent", "2", "--seed", "3"]
    search_run._set_env()
    search_run.run_search(search_run.make_plan([*common, "--name", "a", "--data-dir", str(data_a),
                                                "--num-samples", "3"]), progress=False)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        search_run.run_search(search_run.make_plan([*common, "--name", "b", "--data-dir", str(data_b),
                                                    "--num-samples", "1", "--warm-start", "a"]), progress=False)
    return results, common, err.getvalue()


def _toy_define(trial):  # module level: Ray pickles the searcher
    return {"quality": trial.suggest_float("quality", 0, 1), "epochs": 2, "epoch_seconds": 0.2}


def test_a_time_budget_without_num_samples_keeps_proposing_trials(ray_local, tmp_path):
    """search.run's plan and searcher under a real Tuner (the toy trainable: the search, not training, is tested)."""
    from ray import tune

    from tests.support.toy import toy_trainable

    plan = search_run.make_plan(["--space", "smoke", "--time-budget", str(BUDGET_S), "--results-dir", str(tmp_path)])
    assert plan.num_samples == -1 and plan.expected_trials == get_space("smoke").num_samples

    alg = searcher.make_searcher(_toy_define, seed=0, num_samples=plan.expected_trials, max_t=2)
    t0 = time.monotonic()
    grid = tune.Tuner(toy_trainable, tune_config=tune.TuneConfig(
        metric="best_val_auc", mode="max", search_alg=alg, num_samples=plan.num_samples, max_concurrent_trials=2,
        reuse_actors=True, time_budget_s=plan.time_budget_s),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), verbose=0)).fit()
    assert time.monotonic() - t0 >= 0.95 * BUDGET_S
    assert len(grid) > get_space("smoke").num_samples  # not the space's 4: trials until the budget ran out


def test_warm_started_study_holds_the_earlier_trials_and_tpe_proposes_its_first(searches):
    results, _, _ = searches
    storage = f"sqlite:///{results}/optuna.db"
    a, b = searcher.load_study(storage, "a"), searcher.load_study(storage, "b")
    finished = [t for t in a.trials if t.state.is_finished()]
    copied, own = b.trials[:len(finished)], b.trials[len(finished):]
    for old, new in zip(finished, copied):
        assert (new.params, new.state, new.value, new.intermediate_values) == \
            (old.params, old.state, old.value, old.intermediate_values)
        assert new.user_attrs[searcher.PROPOSED_BY] == "warm start"
    assert len(own) == 1 and own[0].user_attrs[searcher.PROPOSED_BY] == "tpe"
    # What TPE proposes from those trials, and what its random start-up would have drawn: the first is what ran.
    define = define_by_run(get_space("smoke"), ("baseline_bn",), SpaceOptions(max_epochs=1, seed=3))
    with_history = optuna.create_study(direction="maximize", sampler=searcher.make_sampler(3, 1))
    with_history.add_trials(copied)
    empty = optuna.create_study(direction="maximize", sampler=searcher.make_sampler(3, 1))
    tpe, startup = (s.ask() for s in (with_history, empty))
    define(tpe), define(startup)
    assert own[0].params == tpe.params != startup.params


def test_warm_start_across_data_warns_with_both_fingerprints(searches):
    import json

    results, _, stderr = searches
    a, b = (json.loads((results / n / "search.json").read_text()) for n in ("a", "b"))
    assert a["data_fingerprint"] != b["data_fingerprint"] and b["warm_start"] == "a"
    line = next(ln for ln in stderr.splitlines() if ln.startswith("warning: --warm-start a searched other data"))
    assert a["data_fingerprint"][:12] in line and b["data_fingerprint"][:12] in line


def test_warm_start_refuses_another_space_and_an_unknown_search(searches):
    results, common, _ = searches
    other = ["--space", "demo", "--results-dir", str(results), "--name", "c", "--warm-start", "a"]
    with pytest.raises(UserError, match=r"--warm-start 'a' searched another space \(space smoke.*than this search "
                                        r"\(space demo"):
        search_run.make_plan(other)
    with pytest.raises(UserError, match="--warm-start 'nope': no finished search of that name"):
        search_run.make_plan([*common, "--name", "d", "--warm-start", "nope"])


def test_plan_without_num_samples_under_a_budget_is_unbounded(tmp_path):
    plan = search_run.make_plan(["--space", "backbones", "--backbones", "baseline_bn", "--time-budget", "30m",
                                 "--results-dir", str(tmp_path)])
    assert plan.num_samples == -1 and plan.expected_trials == get_space("backbones").num_samples
    assert search_run.make_plan(["--space", "backbones", "--backbones", "baseline_bn",
                                 "--results-dir", str(tmp_path)]).num_samples == 24


def test_backbones_space_starts_from_the_documented_defaults():
    from trainables.config import DEFAULTS
    from trainables.models import num_stages

    points = start_points(get_space("backbones"), ("baseline_bn", "mobilenet_v2"), SpaceOptions())
    assert {p["backbone"] for p in points} == {"baseline_bn", "mobilenet_v2"}
    for p in points:
        assert (p["lr"], p["weight_decay"], p["aug_strength"], p["batch_size"]) == \
            (DEFAULTS["lr"], DEFAULTS["weight_decay"], DEFAULTS["aug_strength"], DEFAULTS["batch_size"])
    assert next(p for p in points if p["backbone"] == "mobilenet_v2")["unfreeze_depth"] == num_stages("mobilenet_v2")
    assert start_points(get_space("backbones"), ("baseline_bn",), SpaceOptions()) == [points[1]]
    assert "unfreeze_depth" not in start_points(get_space("backbones"), ("mobilenet_v2",),
                                                SpaceOptions(pretrained=False))[0]
