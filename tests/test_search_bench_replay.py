"""The recorded learning-curve benchmark: the replay trainable gives back exactly what was recorded, the replay
builds its searchers and schedulers with search.run's own functions, and the event-driven simulation takes the
same decisions as a real Ray Tuner."""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import numpy as np
import pytest

from bench_tables import GRID, make_table
from search import searcher, tuner
from search.bench import record as bench_record
from search.bench import replay as bench_replay
from search.bench import sim as bench_sim
from search.bench.replay import STRATEGIES, Table, build, replay_results
from search.spaces import get_space

REPO_TABLE = Path(__file__).resolve().parents[1] / "bench" / "recorded" / "pcam_lcbench.json"
FIELDS = {"val_auc": "val_auc", "heldout_auc": "heldout_auc", "shifted_auc": "shifted_auc",
          "val_shifted_auc": "val_shifted_auc", "epoch_seconds": "seconds", "train_loss": "train_loss",
          "val_loss": "val_loss", "trial_status": "status"}


@pytest.fixture
def table(tmp_path) -> Table:
    return Table(make_table(tmp_path / "t.json"))


def _check_replay_equals_record(record, results):
    assert [m["epoch"] for m in results] == [e["epoch"] for e in record["epochs"]]
    best = -1.0
    for m, e in zip(results, record["epochs"]):
        for ours, theirs in FIELDS.items():
            if e["status"] == "diverged" and ours == "val_auc":
                assert m[ours] == 0.5  # what fit reports for a diverged epoch
            elif theirs in e:
                assert m[ours] == e[theirs]
        if e["status"] != "diverged":
            best = max(best, e["val_auc"])
            assert m["best_val_auc"] == best


def test_replay_results_are_the_recorded_values(table):
    for record in table.records.values():
        _check_replay_equals_record(record, replay_results(record))


@pytest.mark.skipif(not REPO_TABLE.is_file(), reason="no recorded table in the repo")
def test_replay_results_are_the_recorded_values_of_the_repo_table():
    t = Table(REPO_TABLE)
    assert t.records and t.data["runs"][0]["data_fingerprint"]  # provenance recorded
    for record in t.records.values():
        _check_replay_equals_record(record, replay_results(record))


def test_replay_uses_the_functions_search_run_uses(table, monkeypatch):
    calls = []
    for mod, fn in ((searcher, "make_searcher"), (searcher, "make_sampler"), (tuner, "make_scheduler")):
        real = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, functools.partial(lambda real, fn, *a, **k: calls.append(fn) or real(*a, **k),
                                                       real, fn))
    alg, sched = build(STRATEGIES["defaults"], 0, table, get_space("backbones"), 8, table.max_epochs)
    assert calls == ["make_sampler", "make_searcher", "make_scheduler"]
    assert type(alg) is searcher.FeedbackOptunaSearch
    from ray.tune.schedulers import ASHAScheduler
    assert type(sched) is ASHAScheduler
    # and search.run's Tuner is built by the same two functions
    import inspect
    src = inspect.getsource(tuner.build_tuner)
    assert "searcher.make_searcher(" in src and "make_scheduler(" in src


def test_the_space_starts_from_its_documented_defaults_on_the_grid(table):
    alg, _ = build(STRATEGIES["defaults"], 0, table, get_space("backbones"), 8, table.max_epochs)
    first = [alg.suggest(f"t{i}") for i in range(2)]
    assert {c["backbone"] for c in first} == {"mobilenet_v2", "baseline_bn"}
    mobile = next(c for c in first if c["backbone"] == "mobilenet_v2")
    assert mobile["lr"] == 1e-3 and mobile["aug_strength"] == 0.5 and mobile["unfreeze_depth"] == 6


def test_a_partial_table_replays_the_nearest_recorded_point(tmp_path):
    t = Table(make_table(tmp_path / "t.json"))
    full = dict(t.records)
    t.records = dict(list(full.items())[::2])  # half the grid
    for key, record in full.items():
        got = t.lookup(record["config"], seed=record["config"]["seed"])
        assert got["config"]["backbone"] == record["config"]["backbone"]
        assert (got is record) == (key in t.records)  # exact where recorded
    missing = next(k for k in full if k not in t.records and full[k]["config"]["seed"] == 0)
    assert t.lookup(full[missing]["config"], nearest=False) is None
    alg, sched = build(STRATEGIES["defaults_no_start"], 0, t, get_space("backbones"), 8, t.max_epochs)
    res = bench_sim.simulate(alg, sched, t, max_epochs=t.max_epochs, concurrency=2, stop_epochs=40)
    assert res.rejected == 0 and res.curve[-1].epochs == 40


def test_simulation_takes_the_same_decisions_as_a_real_tuner(ray_local, tmp_path):
    from ray import tune

    path = make_table(tmp_path / "t.json")
    t = Table(path)
    n, space = 8, get_space("backbones")  # ASHA grace 2, rf 3 over 4 epochs: a rung at epoch 2

    def fresh():
        np.random.seed(0)
        return build(STRATEGIES["defaults"], 0, t, space, n, t.max_epochs)

    alg, sched = fresh()
    sim = bench_sim.simulate(alg, sched, t, max_epochs=t.max_epochs, concurrency=1, num_samples=n)
    alg, sched = fresh()
    grid = tune.Tuner(
        tune.with_resources(tune.with_parameters(bench_replay.replay_trainable, table_path=str(path)), {"cpu": 1}),
        tune_config=tune.TuneConfig(metric="best_val_auc", mode="max", search_alg=alg, scheduler=sched,
                                    num_samples=n, max_concurrent_trials=1, reuse_actors=True),
        run_config=tune.RunConfig(name="replay", storage_path=str(tmp_path / "ray"), verbose=0,
                                  callbacks=[searcher.SchedulerStopMarker(t.max_epochs)])).fit()
    from search.outcome import decide
    # Ray's trial folder: <trainable>_<trial id>_<index from 1>_<params>: the order trials were created in
    real = sorted(((int(re.search(rf"{r.metrics['trial_id']}_(\d+)", Path(r.path).name).group(1)), r.config,
                    decide(r.metrics, t.max_epochs).label, int(r.metrics["training_iteration"]), r.metrics_dataframe)
                   for r in grid), key=lambda x: x[0])
    assert len(real) == len(sim.trials) == n
    kinds = set()
    for (_, cfg, label, epochs, df), (_, scfg, slabel, sepochs) in zip(real, sim.trials):
        assert (cfg, label, epochs) == (scfg, slabel, sepochs)
        kinds.add(label.split(" ")[0])
        record = t.lookup(cfg)
        assert list(df["heldout_auc"].dropna()) == [e["heldout_auc"] for e in record["epochs"][:epochs]
                                                    if "heldout_auc" in e]
    assert {"completed", "stopped"} <= kinds  # the case exercises ASHA's stop and a full trial


def test_replay_cli_prints_the_table_and_writes_the_png(table, tmp_path, capsys):
    from search.bench.cli import main

    out = tmp_path / "b.png"
    assert main(["--recorded", table.path, "--seeds", "3", "--budget-trials", "6", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "vs budget in trial-epochs" in text and "vs budget in recorded seconds" in text
    assert "defaults: reaches random's final mean" in text and "seed noise over 3 seed twins" in text
    assert out.is_file() and json.loads(out.with_suffix(".json").read_text())["seeds"] == 3


def test_grid_order_is_balanced_and_twins_follow():
    configs = bench_record.grid_configs()
    assert len(configs) == 240 + 30 and len({bench_record.config_key(c) for c in configs}) == 270
    first = configs[:60]
    assert {c["backbone"] for c in first} == set(GRID) and len({c["lr"] for c in first}) == len(bench_record.LRS)
    assert all(configs[i + 1]["seed"] == 1 and configs[i + 1]["lr"] == configs[i]["lr"]
               for i, c in enumerate(configs[:-1]) if configs[i + 1]["seed"] == 1)


def test_stain_shift_is_fixed_and_strong():
    rng = np.random.default_rng(0)
    x = rng.integers(60, 250, size=(4, 8, 8, 3), dtype=np.uint8)
    a, b = bench_record.stain_shift(x), bench_record.stain_shift(x)
    assert a.dtype == np.uint8 and a.shape == x.shape and (a == b).all()
    assert np.abs(a.astype(int) - x).mean() > 5  # a visible colour change, not a rounding
