"""A genuine smoke search (Ray Tune + Optuna + ASHA + MLflow) on the embedded synthetic data, in-process,
plus an MLflow UI server that must serve the parent run and all its children over its REST API."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from search import run as search_run
from search import tracking, trial_runs

NUM_SAMPLES = 4

BEST_CONFIG_KEYS = {"name", "space", "config", "trial_id", "objective", "best_val_auc", "best_epoch", "epochs_run",
                    "status", "slide_map", "validation",
                    "experiment_path", "checkpoint_path", "data_dir", "cache_path", "data_fingerprint",
                    "tracking_uri", "mlflow_experiment", "parent_run_id", "child_run_id", "val_auc_se", "holdout"}
HOLDOUT = 0.2


@pytest.fixture(scope="session")
def ray_session():
    import ray

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def search_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pcam-cache")


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """240 synthetic patches from 40 pseudo-slides in the Kaggle layout: a CPU epoch in seconds, and slides enough
    for a slide-level holdout with an interval."""
    from datasets.synthetic import write_kaggle_layout

    out = tmp_path_factory.mktemp("tiny") / "pcam"
    write_kaggle_layout(out, n=240, seed=0, n_slides=40)
    return out


@pytest.fixture(scope="module")
def smoke_search(ray_session, search_cache_dir, tiny_data_dir, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    argv = ["--space", "smoke", "--name", "smoke-test", "--data-dir", str(tiny_data_dir), "--num-samples", str(NUM_SAMPLES), "--max-epochs", "2",
            "--results-dir", str(results), "--cache-dir", str(search_cache_dir), "--cpus-per-trial", "1",
            "--max-concurrent", "2", "--seed", "3", "--holdout", str(HOLDOUT)]
    # Not through main(): a UserError must fail the test with its message, not become exit code 2.
    search_run._set_env()
    record = search_run.run_search(search_run.make_plan(argv), progress=False)
    return results, record


def test_smoke_search_writes_leaderboard_and_best_config(smoke_search, tiny_data_dir):
    results, record = smoke_search
    out = results / "smoke-test"
    board = pd.read_csv(out / "leaderboard.csv")
    assert len(board) == NUM_SAMPLES and board["trial_id"].is_unique
    assert list(board["rank"]) == list(range(1, NUM_SAMPLES + 1))
    healthy = ~board["status"].str.startswith(("diverged", "errored"))
    assert healthy.is_monotonic_decreasing  # trials without a trustworthy objective rank last
    assert board.loc[healthy, "best_val_auc"].is_monotonic_decreasing
    assert {"lr", "aug_strength", "status", "stopped_at_rung", "epochs_run", "best_epoch", "backbone"} <= set(board.columns)
    assert board["status"].str.match(r"^(completed|stopped by ASHA at rung 1|diverged at epoch \d)$").all()
    assert (board["status"] == "completed").any()

    best = json.loads((out / "best_config.json").read_text())
    assert set(best) == BEST_CONFIG_KEYS and best == record
    assert best["trial_id"] == board["trial_id"][0] and best["best_val_auc"] == pytest.approx(board["best_val_auc"][0], abs=1e-4)
    assert best["config"]["backbone"] == "baseline_bn" and best["config"]["epochs"] == 2
    assert best["config"]["max_train_samples"] == 256
    assert 0.0 < best["best_val_auc"] <= 1.0  # 2 epochs on 115 patches: the machinery, not the model
    assert Path(best["checkpoint_path"], "checkpoint.pt").is_file()
    assert Path(best["checkpoint_path"], "val_predictions.npz").is_file()
    assert Path(best["experiment_path"]) == results / "ray" / "smoke-test"
    assert best["data_dir"] == str(tiny_data_dir) and Path(best["cache_path"]).is_dir() and best["data_fingerprint"]
    assert best["objective"] == "best_val_auc" and best["validation"] == "slide"  # tiny_data_dir has slide_map.csv
    assert best["tracking_uri"] == f"sqlite:///{results}/mlflow.db"
    assert (out / "roc_best.png").stat().st_size > 1000 and (out / "learning_curves.png").stat().st_size > 1000


def test_smoke_search_mlflow_parent_and_children(smoke_search):
    results, record = smoke_search
    mlf = tracking.client(record["tracking_uri"])
    exp = mlf.get_experiment_by_name("smoke-test")
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.MODEL_TRAINING_KIND  # UI: runs table, not traces
    parent = mlf.get_run(record["parent_run_id"])
    assert parent.info.experiment_id == exp.experiment_id and parent.info.status == "FINISHED"
    assert parent.data.params["space"] == "smoke" and parent.data.params["data_fingerprint"] == record["data_fingerprint"]
    assert parent.data.params["grace_period"] == "1" and parent.data.params["num_samples"] == str(NUM_SAMPLES)
    assert parent.data.metrics["best_val_auc"] == pytest.approx(record["best_val_auc"])
    assert parent.data.tags["validation"] == "slide"
    artifacts = {a.path for a in mlf.list_artifacts(parent.info.run_id)}
    assert {"leaderboard.csv", "best_config.json", "roc_best.png", "learning_curves.png"} <= artifacts
    # Optuna's own plots of the persisted study (importances only with enough completed trials).
    assert {"optimization_history.png", "parallel_coordinate.png", "intermediate_values.png"} <= artifacts
    from search import searcher

    study = searcher.load_study(f"sqlite:///{results}/optuna.db", "smoke-test")
    n_completed = sum(t.state.name == "COMPLETE" for t in study.trials)
    importances = {k for k in parent.data.metrics if k.startswith("importance_")}
    assert ("param_importances.png" in artifacts) == bool(importances) == (n_completed >= 4)

    children = tracking.child_runs(mlf, exp.experiment_id, parent.info.run_id)
    board = pd.read_csv(results / "smoke-test" / "leaderboard.csv")
    assert set(children) == set(board["trial_id"])
    # The parent's description links the compare view's learning curves of exactly its children.
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith(f"[Learning curves of the {NUM_SAMPLES} trials side by side") and "(/#/metric?runs=" in note
    assert all(run.info.run_id in note for run in children.values()) and "workflowType=machine_learning" in note
    assert record["child_run_id"] == children[record["trial_id"]].info.run_id
    for trial_id, run in children.items():
        row = board[board["trial_id"] == trial_id].iloc[0]
        assert run.data.tags[tracking.OUTCOME_TAG] == row["status"] and run.data.tags["backbone"] == "baseline_bn"
        assert run.info.status == ("FAILED" if row["status"].startswith("diverged") else "FINISHED")
        if row["status"].startswith("stopped by ASHA"):
            assert run.data.tags[tracking.RUNG_TAG] == str(int(row["stopped_at_rung"])) == "1"
        assert float(run.data.params["lr"]) == pytest.approx(row["lr"], rel=1e-3)
        steps = [m.step for m in mlf.get_metric_history(run.info.run_id, "val_auc")]
        assert steps == list(range(1, row["epochs_run"] + 1))  # one point per epoch, step = epoch
        assert run.data.metrics["val_auc"] == pytest.approx(
            mlf.get_metric_history(run.info.run_id, "val_auc")[-1].value)


def test_children_log_the_objective_the_leaderboard_ranks(smoke_search):
    """Sorting MLflow's runs table by best_val_auc gives the leaderboard's values (the objective, not the last epoch)."""
    results, record = smoke_search
    mlf = tracking.client(record["tracking_uri"])
    exp = mlf.get_experiment_by_name("smoke-test")
    children = tracking.child_runs(mlf, exp.experiment_id, record["parent_run_id"])
    board = pd.read_csv(results / "smoke-test" / "leaderboard.csv", dtype={"trial_id": str}).set_index("trial_id")
    for trial_id, run in children.items():
        assert run.data.metrics["best_val_auc"] == pytest.approx(board.loc[trial_id, "best_val_auc"], abs=1e-4)
        assert run.data.metrics["best_epoch"] == board.loc[trial_id, "best_epoch"]
    parent = mlf.get_run(record["parent_run_id"])
    assert "leaderboard.json" in {a.path for a in mlf.list_artifacts(parent.info.run_id)}  # MLflow's table artifact
    table = json.loads(Path(mlf.download_artifacts(parent.info.run_id, "leaderboard.json")).read_text())
    assert table["columns"][:3] == ["rank", "trial_id", "best_val_auc"] and len(table["data"]) == NUM_SAMPLES


def test_holdout_is_scored_for_the_top_trials_and_no_trial_saw_it(smoke_search):
    import numpy as np

    from datasets.cache import open_cache
    from datasets.splits import holdout_split

    results, record = smoke_search
    cache = open_cache(record["cache_path"])
    held = holdout_split(cache, HOLDOUT, seed=3)
    assert record["holdout"]["n"] == len(held) > 0 and record["holdout"]["by"] == "slide"
    board = pd.read_csv(results / "smoke-test" / "leaderboard.csv", dtype={"trial_id": str})
    scored = board[board["holdout_auc"].notna()]
    healthy = ~board["status"].str.startswith(("diverged", "errored"))
    assert list(scored.index) == list(range(min(3, int(healthy.sum()))))  # the top trials, in rank order
    assert ((scored["holdout_ci_low"] <= scored["holdout_auc"]) & (scored["holdout_auc"] <= scored["holdout_ci_high"])).all()
    assert record["holdout"]["auc"] == pytest.approx(scored["holdout_auc"].iloc[0], abs=1e-4)
    assert board["val_auc_se"].between(0.001, 0.2).all()
    parent = tracking.client(record["tracking_uri"]).get_run(record["parent_run_id"])
    assert parent.data.metrics["holdout_auc"] == pytest.approx(record["holdout"]["auc"])
    assert parent.data.metrics["holdout_auc_ci_low"] <= parent.data.metrics["holdout_auc"] <= parent.data.metrics["holdout_auc_ci_high"]
    # What every trial really trained and validated on, as it recorded it (once, in its trial folder).
    splits = list((results / "ray" / "smoke-test").glob("*/split_rows.npz"))
    assert len({p.parent for p in splits}) == len(splits) == NUM_SAMPLES
    for path in splits:
        with np.load(path) as f:
            train, val = f["train_rows"], f["val_rows"]
        assert not np.intersect1d(train, held).size and not np.intersect1d(val, held).size
        assert len(train) + len(val) + len(held) == len(cache.indices("train"))  # the rest of the pool is used


def test_smoke_search_persists_the_study_with_what_really_happened(smoke_search):
    """The acceptance check of the TPE feedback on a real search.run: read the persisted Optuna study."""
    from search import searcher

    results, record = smoke_search
    study = searcher.load_study(f"sqlite:///{results}/optuna.db", "smoke-test")
    board = pd.read_csv(results / "smoke-test" / "leaderboard.csv").set_index("trial_id")
    trials = {t.user_attrs[searcher.RAY_TRIAL_ID]: t for t in study.trials}
    assert set(trials) == set(board.index)
    for trial_id, t in trials.items():
        status, best = board.loc[trial_id, "status"], board.loc[trial_id, "best_val_auc"]
        assert t.user_attrs[searcher.OUTCOME_ATTR] == status
        if status == "completed":
            assert t.state.name == "COMPLETE" and t.value == pytest.approx(best, abs=1e-4)
            assert sorted(t.intermediate_values) == [1, 2]
        elif status.startswith("stopped by ASHA"):
            rung = int(board.loc[trial_id, "stopped_at_rung"])
            assert t.state.name == "PRUNED" and rung in t.intermediate_values  # the value at its stop rung
            assert t.intermediate_values[rung] == pytest.approx(best, abs=1e-4)
        else:
            assert status.startswith("diverged") and t.state.name == "FAIL"


def test_search_without_slide_map_warns_and_tags_patch_validation(ray_session, search_cache_dir, tiny_data_dir,
                                                                  tmp_path, capsys):
    import shutil

    data = tmp_path / "no-slides"
    shutil.copytree(tiny_data_dir, data)
    (data / "slide_map.csv").unlink()
    argv = ["--space", "smoke", "--name", "patchval", "--data-dir", str(data), "--num-samples", "1",
            "--max-epochs", "1", "--results-dir", str(tmp_path / "results"), "--cache-dir", str(search_cache_dir)]
    record = search_run.run_search(search_run.make_plan(argv), progress=False)
    err = capsys.readouterr().err
    assert err.count("warning: validation is by patch") == 1 and "--slide-map" in err
    assert record["validation"] == "patch" and record["slide_map"] is None
    parent = tracking.client(record["tracking_uri"]).get_run(record["parent_run_id"])
    assert parent.data.tags["validation"] == "patch"
    # The same data with the map passed explicitly: validation by slide, no warning, the map kept for refit/resume.
    argv = [a if a != "patchval" else "slideval" for a in argv] + ["--slide-map", str(tiny_data_dir / "slide_map.csv")]
    record = search_run.run_search(search_run.make_plan(argv), progress=False)
    assert "warning: validation is by patch" not in capsys.readouterr().err
    assert record["validation"] == "slide" and record["slide_map"] == str(tiny_data_dir / "slide_map.csv")
    settings = json.loads((tmp_path / "results" / "slideval" / "search.json").read_text())
    assert settings["slide_map"] == str(tiny_data_dir / "slide_map.csv")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_ui_serves_parent_and_children(smoke_search, tmp_path):
    results, record = smoke_search
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "server", "--backend-store-uri",
           record["tracking_uri"], "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = open(tmp_path / "mlflow-server.log", "wb")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "mlflow-server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not come up in 90 s"
            time.sleep(0.5)

        def post(path, body):
            req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read())

        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=smoke-test",
                                    timeout=10) as r:
            exp = json.loads(r.read())["experiment"]
        runs = post("/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
        by_id = {r["info"]["run_id"]: r for r in runs}
        assert record["parent_run_id"] in by_id
        kids = [r for r in runs if {"key": "mlflow.parentRunId", "value": record["parent_run_id"]}
                in r["data"].get("tags", [])]
        assert len(kids) == NUM_SAMPLES
        assert {t["value"] for r in kids for t in r["data"]["tags"] if t["key"] == "trial_id"} == \
            set(pd.read_csv(results / "smoke-test" / "leaderboard.csv")["trial_id"])
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()


def test_errored_and_diverged_trials_are_recorded_and_the_search_goes_on(ray_session, search_cache_dir, tiny_data_dir,
                                                                        tmp_path):
    """Real train_pcam trials: one healthy, one whose loss blows up, one that raises (negative lr)."""
    from ray import tune

    from datasets.cache import prepare_dataset
    from search import report
    from trainables.train import train_pcam

    cache = prepare_dataset(tiny_data_dir, search_cache_dir, progress=False)
    uri, storage = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "ray"
    parent, resumed = tracking.open_parent_run(uri, "reliability", str(storage / "reliability"), {"space": "test"})
    assert not resumed
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(train_pcam, cache_path=str(cache.path)), {"cpu": 1}),
        param_space={"backbone": "baseline_bn", "pretrained": False, "epochs": 2, "max_train_samples": 128,
                     "batch_size": 64, "lr": tune.grid_search([3e-3, 1e30, -1.0])},
        tune_config=tune.TuneConfig(metric="val_auc", mode="max", max_concurrent_trials=2),
        run_config=tune.RunConfig(name="reliability", storage_path=str(storage), verbose=0,
                                  callbacks=[trial_runs.MlflowTrialCallback(uri, "reliability", parent, 2)]))
    grid = tuner.fit()
    by_lr = {s.config["lr"]: s for s in report.summarize(grid, max_epochs=2)}
    assert by_lr[3e-3].status == "completed" and by_lr[3e-3].best_val_auc > 0.5
    assert by_lr[1e30].status == "diverged at epoch 1" and by_lr[1e30].best_val_auc == 0.5
    assert by_lr[-1.0].status.startswith("errored: ") and "learning rate" in by_lr[-1.0].status.lower()

    mlf = tracking.client(uri)
    kids = tracking.child_runs(mlf, mlf.get_experiment_by_name("reliability").experiment_id, parent)
    tags = {float(r.data.params["lr"]): (r.info.status, r.data.tags["outcome"], r.data.tags.get("error", ""))
            for r in kids.values()}
    assert tags[3e-3] == ("FINISHED", "completed", "")
    assert tags[1e30] == ("FAILED", "diverged at epoch 1", "")
    assert tags[-1.0][0] == "FAILED" and tags[-1.0][1] == by_lr[-1.0].status and "learning rate" in tags[-1.0][2].lower()


def test_top_k_refit_averages_the_best_distinct_configs_of_the_search(smoke_search, monkeypatch):
    """refit_best --top-k 2 on this real search: ranks from its leaderboard, full configs from its Ray experiment."""
    import mlflow
    import numpy as np
    import torch

    from datasets.cache import open_cache
    from search.refit import best as refit_best
    from search.refit.ensemble import ENSEMBLE_FORMAT, load_ensemble

    results, record = smoke_search
    board = pd.read_csv(results / "smoke-test" / "leaderboard.csv", dtype={"trial_id": str})
    usable = board[~board["status"].str.startswith(("diverged", "errored"))].head(2)
    assert len(usable) == 2, board  # seed 3: the search yields two healthy trials
    torch.set_num_threads(1)
    assert refit_best.main(["--results-dir", str(results), "--name", "smoke-test", "--top-k", "2"]) == 0
    s = json.loads((results / "smoke-test" / "refit.json").read_text())
    assert s["mode"] == "top-k=2" and [m["trial_id"] for m in s["members"]] == list(usable["trial_id"])
    assert [m["epochs"] for m in s["members"]] == list(usable["best_epoch"])  # each stops at its own best epoch
    assert all(m["schedule_epochs"] == 2 for m in s["members"])  # along the search's 2-epoch schedule

    blob = torch.load(results / "smoke-test" / "model.pt", weights_only=True)
    assert blob["format"] == ENSEMBLE_FORMAT
    lrs = dict(zip(board["trial_id"], board["lr"]))
    assert [m["config"]["lr"] for m in blob["members"]] == pytest.approx([lrs[t] for t in usable["trial_id"]], rel=1e-3)
    assert all(m["config"]["max_train_samples"] is None for m in blob["members"])  # all labelled rows, not the search's 256

    cache = open_cache(record["cache_path"])
    images = np.ascontiguousarray(cache.images[cache.indices("test")])
    submission = pd.read_csv(results / "smoke-test" / "submission.csv")["label"].to_numpy()
    np.testing.assert_array_equal(load_ensemble(results / "smoke-test" / "model.pt").predict_proba(images), submission)
    mlflow.set_tracking_uri(record["tracking_uri"])
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    served = mlflow.pyfunc.load_model(f"models:/pcam-smoke-test/{s['registered_version']}")
    np.testing.assert_array_equal(served.predict(images), submission)
