"""search.refit_best and search.predict end to end on tiny synthetic data (CPU, seconds).

The search itself is not run here: the tests write best_config.json per the schema in
docs/architecture.md (tests/test_refit_integration.py runs a real search first). Everything else is real:
the decode-once cache, trainables' fit/predict_proba/save_model, files on disk, a sqlite MLflow store
with a model registry.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from datasets.cache import prepare_dataset
from datasets.synthetic import write_kaggle_layout
from search.refit import predict
from search.refit import best as refit_best
from trainables.train import DEFAULTS, load_model, predict_proba

REPO = Path(__file__).resolve().parents[1]
NAME = "tiny"
# Small, fast and still learnable: the baseline CNN, a few hundred patches, 2 epochs.
CONFIG = {**DEFAULTS, "backbone": "baseline", "pretrained": False, "batch_size": 32, "lr": 3e-3, "input_size": 48,
          "aug_strength": 0.2, "epochs": 3, "warmup_epochs": 0, "seed": 0}


def write_best_config(results: Path, name: str, cache, tracking_uri: str, **overrides) -> Path:
    record = {
        "name": name, "space": "smoke", "config": CONFIG, "trial_id": "t0001", "best_val_auc": 0.8,
        "best_epoch": 2, "epochs_run": 3, "status": "completed",
        "experiment_path": str(results / "ray" / name), "checkpoint_path": None,
        "data_dir": cache.source["data_dir"], "cache_path": str(cache.path), "data_fingerprint": cache.fingerprint,
        "tracking_uri": tracking_uri, "mlflow_experiment": name, "parent_run_id": None, "child_run_id": None,
        **overrides,
    }
    path = results / name / "best_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


# What search.run writes into best_config.json about its untouched holdout (search.holdout.record).
HOLDOUT = {"fraction": 0.1, "n": 31, "by": "slide", "auc": 0.81, "ci_low": 0.7, "ci_high": 0.9}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A synthetic Kaggle-layout data dir, its cache, and a best_config.json pointing at both."""
    root = tmp_path_factory.mktemp("refit")
    data_dir = root / "data"
    write_kaggle_layout(data_dir, n=300, seed=1, test_fraction=0.2)
    # As a slide map recovered for the Kaggle training set: the test ids are not in it (their one slide would
    # give no interval; unmapped, each test patch is its own unit of the bootstrap).
    train_ids = set(pd.read_csv(data_dir / "train_labels.csv", dtype=str)["id"])
    slides = pd.read_csv(data_dir / "slide_map.csv", dtype=str)
    slides[slides["id"].isin(train_ids)].to_csv(data_dir / "slide_map.csv", index=False)
    cache = prepare_dataset(data_dir=str(data_dir), cache_dir=str(root / "cache"), progress=False)
    results = root / "results"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    write_best_config(results, NAME, cache, uri, holdout=HOLDOUT)
    return {"root": root, "data_dir": data_dir, "cache": cache, "results": results, "uri": uri}


def run_refit(tiny, *extra: str) -> int:
    return refit_best.main(["--results-dir", str(tiny["results"]), *extra])


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def refitted(tiny):
    """One refit (newest search, so no --name) shared by the checks below; MLflow's warnings recorded."""
    torch.set_num_threads(1)
    records = _Records()
    logging.getLogger("mlflow").addHandler(records)
    printed = io.StringIO()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(printed):
            warnings.simplefilter("always")
            assert run_refit(tiny) == 0
    finally:
        logging.getLogger("mlflow").removeHandler(records)
    out = tiny["results"] / NAME
    return {**tiny, "submission": out / "submission.csv", "model": out / "model.pt", "printed": printed.getvalue(),
            "summary": json.loads((out / "refit.json").read_text()),
            "warnings": records.messages + [str(w.message) for w in caught]}


def test_refit_reports_the_search_store_not_the_process_default(refitted):
    # the printed `mlflow ui` command is built from this; it must be the search's store even though the
    # refit hands the process' own tracking URI back when its run ends
    assert refitted["summary"]["mlflow_tracking_uri"] == refitted["uri"]
    import mlflow

    assert mlflow.get_tracking_uri() != refitted["uri"]


def test_submission_matches_sample_submission(refitted):
    sample = pd.read_csv(refitted["data_dir"] / "sample_submission.csv", dtype={"id": str})
    got = pd.read_csv(refitted["submission"], dtype={"id": str})
    assert list(got.columns) == ["id", "label"]
    assert got["id"].tolist() == sample["id"].tolist()  # same ids, same order
    assert got["label"].between(0, 1).all() and got["label"].notna().all()
    assert got["label"].nunique() > len(got) // 2  # probabilities, not hard 0/1 labels
    assert not list(refitted["submission"].parent.glob(".*tmp*"))


def test_refit_trains_on_all_labelled_rows_for_the_peak_epoch_count(refitted):
    s = refitted["summary"]
    cache = refitted["cache"]
    assert s["epochs"] == 2 and s["schedule_epochs"] == 3  # best_epoch of best_config.json, of the trial's 3-epoch schedule
    assert s["n_train"] == int(((cache.split != "test") & (cache.labels >= 0)).sum())
    # test_labels.csv beside sample_submission.csv is picked up: the refit reports a test AUC
    assert s["test_auc"] is not None and 0.5 < s["test_auc"] <= 1.0
    assert s["test_labels"] == str(refitted["data_dir"] / "test_labels.csv")
    assert (refitted["results"] / NAME / "test_roc_curve.png").stat().st_size > 1000


def test_refit_prints_its_test_auc_with_an_interval_next_to_the_search_holdout(refitted):
    import re

    import mlflow

    s, printed = refitted["summary"], refitted["printed"]
    lo, hi = s["test_auc_ci"]
    assert lo < s["test_auc"] < hi and hi - lo < 0.5
    line = next(ln for ln in printed.splitlines() if ln.startswith("test AUC"))
    assert re.match(rf"test AUC {s['test_auc']:.4f} \(95 % CI {lo:.4f}-{hi:.4f}, patch bootstrap, n=", line), line
    assert "search holdout estimate of the chosen trial's checkpoint: AUC 0.8100 (95 % CI 0.7000-0.9000) on 31" in printed
    assert s["search_holdout"] == HOLDOUT
    metrics = mlflow.MlflowClient(refitted["uri"]).get_run(s["mlflow_run_id"]).data.metrics
    assert metrics["test_auc_ci_low"] == pytest.approx(lo) and metrics["test_auc_ci_high"] == pytest.approx(hi)


def test_refit_follows_the_trials_schedule_and_stops_at_its_best_epoch(refitted):
    """The refit's weights are those a 3-epoch run of the trial's config has after epoch 2 (same rows, same seed):
    the learning-rate path the search validated, not a 2-epoch schedule squeezed into the best epoch count."""
    from trainables.train import fit

    cache = refitted["cache"]
    rows = np.flatnonzero((cache.split != "test") & (cache.labels >= 0))
    at_epoch = {}

    def keep(metrics, state, preds):
        at_epoch[metrics["epoch"]] = ({k: v.detach().clone() for k, v in state["model"].items()}, metrics["lr"])

    fit(CONFIG, cache, rows, on_epoch=keep)  # CONFIG["epochs"] == 3: the trial's horizon
    refit_model, _ = load_model(refitted["model"])
    refit_state = refit_model.state_dict()
    for k, v in at_epoch[2][0].items():
        assert torch.equal(refit_state[k].cpu(), v.cpu()), k
    assert any(not torch.equal(refit_state[k].cpu(), v.cpu()) for k, v in at_epoch[3][0].items())  # epoch 3 moves on
    import mlflow
    lr = mlflow.MlflowClient(refitted["uri"]).get_metric_history(refitted["summary"]["mlflow_run_id"], "lr")
    assert [m.step for m in lr] == [1, 2] and lr[-1].value == pytest.approx(at_epoch[2][1])
    assert lr[-1].value > 0.2 * CONFIG["lr"]  # mid-schedule; a squeezed 2-epoch cosine would end near 0


def test_model_pt_round_trip_reproduces_the_submission_exactly(refitted):
    state = torch.load(refitted["model"], weights_only=True)  # plain tensors/containers only
    assert isinstance(state, dict)
    model, config = load_model(refitted["model"])
    assert config["backbone"] == "baseline" and config["epochs"] == 3  # the schedule's horizon; it stopped at 2
    cache = refitted["cache"]
    probs = predict_proba(model, cache.images[cache.indices("test")], config, tta=True)
    sub = pd.read_csv(refitted["submission"])
    # written with repr: every float32 probability reads back as itself (no ties from rounding)
    np.testing.assert_array_equal(sub["label"].to_numpy().astype(np.float32), probs)


def test_registered_model_is_a_pickle_free_pyfunc_that_reproduces_the_submission(refitted, monkeypatch):
    import mlflow

    s = refitted["summary"]
    assert s["registered_model"] == f"pcam-{NAME}"
    mlflow.set_tracking_uri(refitted["uri"])
    # MLflow refuses every pickle (its PyTorch pickle flavour, cloudpickled python models) with this set
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    loaded = mlflow.pyfunc.load_model(f"models:/pcam-{NAME}/{s['registered_version']}")
    cache = refitted["cache"]
    probs = loaded.predict(np.ascontiguousarray(cache.images[cache.indices("test")]))
    sub = pd.read_csv(refitted["submission"])
    np.testing.assert_array_equal(np.asarray(probs).astype(np.float32), sub["label"].to_numpy().astype(np.float32))
    plain = loaded.predict(np.ascontiguousarray(cache.images[cache.indices("test")[:5]]), params={"tta": False})
    model, config = load_model(refitted["model"])
    np.testing.assert_array_equal(plain, predict_proba(model, cache.images[cache.indices("test")[:5]], config, tta=False))

    run = mlflow.get_run(s["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["backbone"] == "baseline"
    assert "test_auc" in run.data.metrics and "train_loss" in run.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"submission.csv", "test_roc_curve.png"} <= artifacts
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == [1, 2]  # one point per epoch


def test_refit_saves_no_pickle(refitted):
    """No MLflow pickle flavour: the logged model is code (search/mlflow_model.py) plus model.pt, and MLflow
    has nothing to warn about (it warned "Saving pytorch model by Pickle ..." on every refit before)."""
    import mlflow

    assert not [m for m in refitted["warnings"] if "pickle" in m.lower()], refitted["warnings"]

    s = refitted["summary"]
    mlflow.set_tracking_uri(refitted["uri"])
    local = Path(mlflow.artifacts.download_artifacts(s["model_uri"]))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert "mlflow_model.py" in files and any(f.endswith("model.pt") for f in files)
    assert not [f for f in files if f.endswith((".pkl", ".pickle"))] and "data/model.pth" not in files


def test_predict_cli_scores_a_folder_of_tifs(refitted, tmp_path, capsys):
    test_dir = refitted["data_dir"] / "test"
    chosen = sorted(test_dir.glob("*.tif"))[:7]
    folder = tmp_path / "patches"
    folder.mkdir()
    for f in chosen:
        shutil.copy(f, folder / f.name)
    out = tmp_path / "scores.csv"
    assert predict.main(["--model", str(refitted["model"]), "--images", str(folder), "--out", str(out)]) == 0
    assert "scoring with baseline: " in capsys.readouterr().out   # the precision/layout it ran in
    got = pd.read_csv(out, dtype={"id": str})
    assert got["id"].tolist() == sorted(f.stem for f in chosen)
    sub = pd.read_csv(refitted["submission"], dtype={"id": str}).set_index("id")
    np.testing.assert_allclose(got["label"], sub.loc[got["id"], "label"], rtol=1e-4, atol=1e-6)


def test_predict_precision_option_overrides_the_models(refitted, tmp_path, capsys):
    folder = tmp_path / "patches"
    folder.mkdir()
    for f in sorted((refitted["data_dir"] / "test").glob("*.tif"))[:5]:
        shutil.copy(f, folder / f.name)
    out = tmp_path / "scores.csv"
    argv = ["--model", str(refitted["model"]), "--images", str(folder), "--out", str(out)]
    assert predict.main([*argv, "--precision", "fp32"]) == 0
    assert "fp32 NCHW on cpu (precision fp32 requested: the reference path" in capsys.readouterr().out
    fp32 = pd.read_csv(out)["label"].to_numpy()
    assert predict.main([*argv, "--precision", "bf16"]) == 0
    assert "bf16 channels_last on cpu (precision bf16 requested" in capsys.readouterr().out
    np.testing.assert_allclose(pd.read_csv(out)["label"], fp32, atol=0.02)


def test_predict_streams_a_folder_larger_than_its_chunk_in_bounded_memory(refitted, tmp_path, monkeypatch):
    """480 patches scored 64 at a time: the peak of Python-tracked memory (numpy's arrays included) stays
    well under the decoded folder's size, and the scores are those of the whole folder decoded at once."""
    import tracemalloc

    from datasets.images import read_patches
    from search.refit.ensemble import load_ensemble

    src = sorted((refitted["data_dir"] / "test").glob("*.tif"))
    folder, n = tmp_path / "many", 480
    folder.mkdir()
    for i in range(n):
        (folder / f"p{i:04d}.tif").symlink_to(src[i % len(src)])
    monkeypatch.setattr(predict, "CHUNK", 64)
    out = tmp_path / "scores.csv"
    tracemalloc.start()
    try:
        rc = predict.main(["--model", str(refitted["model"]), "--images", str(folder), "--out", str(out), "--no-tta"])
        _, streamed_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        ids = sorted(p.stem for p in folder.glob("*.tif"))
        whole = read_patches(folder, ids, progress=False)  # what search.predict did before
        _, whole_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rc == 0 and whole.nbytes == n * 96 * 96 * 3
    assert streamed_peak < whole.nbytes / 3 < whole_peak / 3, (streamed_peak, whole_peak)
    before = load_ensemble(refitted["model"]).predict_proba(whole, tta=False)
    got = pd.read_csv(out, dtype={"id": str})
    assert got["id"].tolist() == ids
    np.testing.assert_array_equal(got["label"].to_numpy().astype(np.float32), before)


def test_predict_out_that_cannot_be_written_fails_in_one_line_before_scoring(refitted, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    folder = refitted["data_dir"] / "test"
    for out, expected in ((blocker / "scores.csv", "is a file, not a folder"), (tmp_path, "is a folder"),
                          (Path("/proc/pcam-scores.csv"), "cannot write into /proc")):
        rc = predict.main(["--model", str(refitted["model"]), "--images", str(folder), "--out", str(out)])
        captured = capsys.readouterr()
        assert rc == 2 and "scoring with" not in captured.out, captured.out
        err = captured.err.strip()
        assert err.startswith(f"error: --out {out}: ") and expected in err and "\n" not in err


def test_predict_cli_names_a_bad_image(refitted, tmp_path, capsys):
    folder = tmp_path / "patches"
    folder.mkdir()
    (folder / "broken.tif").write_bytes(b"not a tiff")
    rc = predict.main(["--model", str(refitted["model"]), "--images", str(folder), "--out", str(tmp_path / "o.csv")])
    err = last_line(capsys.readouterr().err)
    assert rc == 2 and err.startswith("error: ") and "broken.tif" in err
    assert not (tmp_path / "o.csv").exists()


def test_no_tta_and_seed_and_epochs_options(tiny, tmp_path):
    results = tmp_path / "results"
    write_best_config(results, "opts", tiny["cache"], tiny["uri"])
    rc = refit_best.main(["--results-dir", str(results), "--name", "opts", "--epochs", "1", "--no-tta",
                          "--seed", "7", "--no-mlflow", "--precision", "fp32"])
    assert rc == 0
    s = json.loads((results / "opts" / "refit.json").read_text())
    assert s["epochs"] == 1 and s["tta"] is False and s["mlflow_run_id"] is None
    _, config = load_model(results / "opts" / "model.pt")
    assert config["seed"] == 7 and config["epochs"] == 3  # --epochs moves the stop, not the trial's schedule
    assert config["precision"] == "fp32"


# ---------------------------------------------------------------- one-line errors
def last_line(stderr: str) -> str:
    """What is left on the terminal at the end: progress bars redraw with \r and are cleared."""
    return re.split(r"[\r\n]", stderr.strip())[-1]


def _error(capsys, argv) -> str:
    assert refit_best.main(argv) == 2
    err = capsys.readouterr().err
    assert last_line(err).startswith("error: ") and err.count("error: ") == 1 and "Traceback" not in err
    return last_line(err)


def test_error_no_search(tmp_path, capsys):
    err = _error(capsys, ["--results-dir", str(tmp_path)])
    assert "no search found" in err and "python -m search.run" in err


def test_error_unknown_name_lists_searches(tiny, capsys):
    err = _error(capsys, ["--results-dir", str(tiny["results"]), "--name", "nope"])
    assert "no search named 'nope'" in err and NAME in err


def test_error_unfinished_search_says_resume(tmp_path, capsys):
    (tmp_path / "ray" / "half").mkdir(parents=True)
    err = _error(capsys, ["--results-dir", str(tmp_path), "--name", "half"])
    assert "--resume" in err


@pytest.mark.parametrize("overrides", [{"best_val_auc": None, "status": "errored: boom"},
                                       {"best_val_auc": 0.5, "status": "diverged at epoch 1"}])
def test_error_no_completed_trial(tiny, tmp_path, capsys, overrides):
    write_best_config(tmp_path, "bad", tiny["cache"], tiny["uri"], **overrides)
    err = _error(capsys, ["--results-dir", str(tmp_path), "--name", "bad"])
    assert "no completed trial" in err


def test_error_bad_test_labels(tiny, tmp_path, capsys):
    bad = tmp_path / "labels.csv"
    bad.write_text("id,label\nsomething,1\n")
    err = _error(capsys, ["--results-dir", str(tiny["results"]), "--name", NAME, "--test-labels", str(bad)])
    assert str(bad) in err and "no label for" in err


def test_error_test_ids_do_not_match_sample_submission(tiny, tmp_path, capsys):
    data_dir = tmp_path / "data"
    shutil.copytree(tiny["data_dir"], data_dir)
    cache = prepare_dataset(data_dir=str(data_dir), cache_dir=str(tmp_path / "cache"), progress=False)
    write_best_config(tmp_path / "results", "moved", cache, tiny["uri"])
    sample = pd.read_csv(data_dir / "sample_submission.csv", dtype={"id": str})
    sample.iloc[::-1].to_csv(data_dir / "sample_submission.csv", index=False)  # edited after the search
    err = _error(capsys, ["--results-dir", str(tmp_path / "results"), "--name", "moved", "--no-mlflow"])
    assert "sample_submission.csv" in err and "do not match" in err


# ---------------------------------------------------------------- interruption
def test_killed_refit_leaves_previous_outputs_and_can_rerun(tiny, tmp_path):
    results = tmp_path / "results"
    write_best_config(results, "kill", tiny["cache"], tiny["uri"], best_epoch=1)
    args = ["--results-dir", str(results), "--name", "kill"]
    assert refit_best.main([*args, "--no-mlflow"]) == 0
    out = results / "kill"
    before = {f: (out / f).read_bytes() for f in ("model.pt", "submission.csv")}

    # A long refit, SIGKILLed once training is under way; plant a dead writer's temporary as well.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "search.refit_best", *args, "--epochs", "50"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("epoch 1/"):  # training is under way (and its MLflow run open)
                break
        else:
            pytest.fail(f"refit ended before its first epoch (rc {proc.wait()})")
        (out / ".model.pt.tmp-999999999").write_bytes(b"half written")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.stdout.close()
    assert {f: (out / f).read_bytes() for f in before} == before

    assert refit_best.main([*args, "--epochs", "1", "--seed", "3"]) == 0
    assert not list(out.glob(".*tmp*"))
    import mlflow
    runs = mlflow.MlflowClient(tiny["uri"]).search_runs(
        [mlflow.MlflowClient(tiny["uri"]).get_experiment_by_name("kill").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]  # the killed run is not left "running"
    assert (out / "model.pt").read_bytes() != before["model.pt"]
    sample = pd.read_csv(tiny["data_dir"] / "sample_submission.csv", dtype={"id": str})
    assert pd.read_csv(out / "submission.csv", dtype={"id": str})["id"].tolist() == sample["id"].tolist()


# ---------------------------------------------------------------- --from-checkpoint
def test_from_checkpoint_predicts_with_the_trial_weights(tiny, tmp_path):
    from trainables.train import fit, load_checkpoint, save_checkpoint

    cache = tiny["cache"]
    ckpt = tmp_path / "checkpoint_000000"
    fit(CONFIG, cache, cache.indices("train")[:64], epochs=1,
        on_epoch=lambda metrics, state, preds: save_checkpoint(ckpt, state, preds))
    results = tmp_path / "results"
    write_best_config(results, "ckpt", cache, tiny["uri"], checkpoint_path=str(ckpt))
    assert refit_best.main(["--results-dir", str(results), "--name", "ckpt", "--from-checkpoint", "--no-mlflow"]) == 0
    model, config = load_model(results / "ckpt" / "model.pt")
    trial = load_checkpoint(ckpt)
    assert config == trial["config"]
    for k, v in trial["model"].items():
        assert torch.equal(model.state_dict()[k].cpu(), v)
    s = json.loads((results / "ckpt" / "refit.json").read_text())
    assert s["from_checkpoint"] and s["n_train"] == 0


def test_error_from_checkpoint_without_checkpoint(tiny, tmp_path, capsys):
    write_best_config(tmp_path, "gone", tiny["cache"], tiny["uri"], checkpoint_path=str(tmp_path / "nope"))
    err = _error(capsys, ["--results-dir", str(tmp_path), "--name", "gone", "--from-checkpoint", "--no-mlflow"])
    assert "checkpoint" in err and "is missing" in err and "without --from-checkpoint" in err


# ---------------------------------------------------------------- --folds: an ensemble with an out-of-fold AUC
@pytest.fixture(scope="module")
def folded(tiny):
    """--folds 3 of the tiny search (its synthetic data carries a slide map, so folds are by slide)."""
    torch.set_num_threads(1)
    results = tiny["root"] / "folds-results"
    write_best_config(results, "folds", tiny["cache"], tiny["uri"])
    assert refit_best.main(["--results-dir", str(results), "--name", "folds", "--folds", "3"]) == 0
    out = results / "folds"
    return {**tiny, "out": out, "summary": json.loads((out / "refit.json").read_text())}


def test_folds_are_slide_disjoint_and_the_oof_auc_comes_from_held_out_predictions(folded):
    from sklearn.metrics import roc_auc_score

    cache, s = folded["cache"], folded["summary"]
    labelled = (cache.split != "test") & (cache.labels >= 0)
    oof = pd.read_csv(folded["out"] / "oof.csv", dtype={"id": str, "slide": str})
    assert sorted(oof["id"]) == sorted(cache.ids[labelled]) and oof["id"].is_unique  # every labelled patch, once
    assert oof.groupby("slide")["fold"].nunique().max() == 1  # no slide in two folds
    by_id = dict(zip(cache.ids, cache.groups))
    assert (oof["slide"] == oof["id"].map(by_id)).all()
    assert s["mode"] == "folds=3" and s["oof_auc"] == pytest.approx(roc_auc_score(oof["label"], oof["prob"]))
    assert len(s["members"]) == 3 and s["oof"] == str(folded["out"] / "oof.csv")
    for i, m in enumerate(s["members"], 1):
        assert m["n_held_out"] == (oof["fold"] == i).sum() and m["n_train"] + m["n_held_out"] == labelled.sum()
        held = oof[oof["fold"] == i]
        assert m["held_out_auc"] == pytest.approx(roc_auc_score(held["label"], held["prob"]))
        assert m["epochs"] == 2 and m["schedule_epochs"] == 3


def test_fold_members_held_out_predictions_are_their_own(folded):
    """Each fold's oof.csv scores are what that fold's network, which never saw those rows, predicts for them."""
    from search.refit.ensemble import load_ensemble

    cache = folded["cache"]
    ensemble = load_ensemble(folded["out"] / "model.pt")
    oof = pd.read_csv(folded["out"] / "oof.csv", dtype={"id": str})
    row_of = {i: r for r, i in enumerate(cache.ids)}
    for i, (net, config) in enumerate(ensemble.members, 1):
        held = oof[oof["fold"] == i]
        probs = predict_proba(net, cache.images[[row_of[x] for x in held["id"]]], config, tta=True)
        np.testing.assert_allclose(held["prob"].to_numpy(), probs, rtol=1e-5, atol=1e-7)


def test_ensemble_model_file_registered_model_and_predict_match_the_submission(folded, tmp_path, monkeypatch):
    import mlflow
    from search.refit.ensemble import ENSEMBLE_FORMAT, load_ensemble

    cache, s = folded["cache"], folded["summary"]
    test_images = np.ascontiguousarray(cache.images[cache.indices("test")])
    submission = pd.read_csv(folded["out"] / "submission.csv", dtype={"id": str})
    blob = torch.load(folded["out"] / "model.pt", weights_only=True)
    assert blob["format"] == ENSEMBLE_FORMAT and [m["name"] for m in blob["members"]] == ["fold 1/3", "fold 2/3", "fold 3/3"]

    ensemble = load_ensemble(folded["out"] / "model.pt")
    np.testing.assert_array_equal(ensemble.predict_proba(test_images), submission["label"].to_numpy())
    alone = [predict_proba(net, test_images, cfg) for net, cfg in ensemble.members]
    np.testing.assert_allclose(np.mean(alone, axis=0), submission["label"].to_numpy(), rtol=1e-6)
    assert all(np.abs(a - submission["label"].to_numpy()).max() > 1e-4 for a in alone)  # the mean, not one member

    mlflow.set_tracking_uri(folded["uri"])
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    served = mlflow.pyfunc.load_model(f"models:/pcam-folds/{s['registered_version']}")
    np.testing.assert_array_equal(served.predict(test_images), submission["label"].to_numpy())

    folder = tmp_path / "patches"
    folder.mkdir()
    chosen = sorted((folded["data_dir"] / "test").glob("*.tif"))[:7]
    for f in chosen:
        shutil.copy(f, folder / f.name)
    assert predict.main(["--model", str(folded["out"] / "model.pt"), "--images", str(folder), "--out", str(tmp_path / "o.csv")]) == 0
    got = pd.read_csv(tmp_path / "o.csv", dtype={"id": str})
    expected = submission.set_index("id").loc[got["id"], "label"].to_numpy()
    np.testing.assert_allclose(got["label"].to_numpy(), expected, rtol=1e-5, atol=1e-7)


def test_fold_members_have_nested_mlflow_runs(folded):
    import mlflow

    s = folded["summary"]
    client = mlflow.MlflowClient(folded["uri"])
    parent = client.get_run(s["mlflow_run_id"])
    assert parent.data.params["refit_mode"] == "folds=3" and parent.data.params["members"] == "3"
    assert parent.data.metrics["oof_auc"] == pytest.approx(s["oof_auc"]) and "test_auc" in parent.data.metrics
    lo, hi = s["oof_auc_ci"]
    assert lo < s["oof_auc"] < hi and parent.data.metrics["oof_auc_ci_low"] == pytest.approx(lo)
    for m in s["members"]:
        run = client.get_run(m["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.info.status == "FINISHED"
        assert run.data.tags["pcam_tune.role"] == "refit-member" and run.data.tags["pcam_tune.member"] == m["name"]
        assert run.data.params["n_held_out"] == str(m["n_held_out"]) and run.data.params["stop_epoch"] == "2"
        assert [h.step for h in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
        assert run.data.metrics["held_out_auc"] == pytest.approx(m["held_out_auc"])
        assert run.data.metrics["test_auc"] == pytest.approx(m["test_auc"])


@pytest.mark.parametrize("argv, match", [
    (["--folds", "3", "--top-k", "2"], "choose one"),
    (["--folds", "1"], "at least 2 folds"),
    (["--folds", "3", "--from-checkpoint"], "cannot be combined"),
    (["--top-k", "2"], "leaderboard.csv"),  # the tiny search has no leaderboard / Ray experiment
    (["--device", "cuda:7"], "--device cuda:7: this machine has"),  # before any data is read or trained
])
def test_error_bad_ensemble_options(tiny, capsys, argv, match):
    err = _error(capsys, ["--results-dir", str(tiny["results"]), "--name", NAME, "--no-mlflow", *argv])
    assert match in err
