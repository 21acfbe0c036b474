"""Kill a real `python -m search.run` with SIGKILL mid-search, resume it, and check that no trial and no MLflow
run is lost or duplicated, and that trials finished before the kill are not trained again."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from search import tracking

REPO = Path(__file__).resolve().parents[1]
NAME = "resume-test"
NUM_SAMPLES = 6  # enough that the search cannot end between two polls on a fast machine


def start_search(tmp_path, *extra, log="first.log"):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}  # the live table must reach the log while the search runs
    args = [sys.executable, "-m", "search.run", "--name", NAME, "--results-dir", str(tmp_path / "results"),
            "--cache-dir", str(tmp_path / "cache"), "--cpus-per-trial", "1", "--max-concurrent", "1", *extra]
    # Own session: SIGKILL then takes the driver and every Ray process it started, like a crashed machine.
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=open(tmp_path / log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def finished_children(tracking_uri: str) -> dict[str, object]:
    mlf = tracking.client(tracking_uri)
    exp = mlf.get_experiment_by_name(NAME)
    if exp is None:
        return {}
    parents = mlf.search_runs([exp.experiment_id], filter_string=f"tags.{tracking.ROLE_TAG} = 'parent'")
    if not parents:
        return {}
    kids = tracking.child_runs(mlf, exp.experiment_id, parents[0].info.run_id)
    return {t: r for t, r in kids.items() if r.data.tags.get("outcome") not in (None, "running")}


def progress_rows(experiment: Path, trial_id: str) -> int:
    (trial_dir,) = [p for p in experiment.iterdir() if trial_id in p.name]
    return len(pd.read_csv(trial_dir / "progress.csv"))


# The smoke space as a file a user wrote (another lr range): the search resumes from the copy kept with its settings.
USER_SPACE = (REPO / "search" / "space_files" / "smoke.yaml").read_text().replace("name: smoke", "name: mine") \
    .replace("high: 3e-2", "high: 2e-2")


@pytest.mark.parametrize("space", [
    "built-in", pytest.param("file", marks=pytest.mark.slow)])  # the same resume; a file's copy is what differs
def test_sigkill_then_resume_loses_and_duplicates_nothing(tmp_path, space):
    from datasets.synthetic import write_kaggle_layout

    write_kaggle_layout(tmp_path / "pcam", n=240, seed=0)  # tiny: seconds per CPU epoch
    uri = f"sqlite:///{tmp_path / 'results'}/mlflow.db"
    experiment = tmp_path / "results" / "ray" / NAME
    if space == "file":
        (tmp_path / "mine.yaml").write_text(USER_SPACE)
    chosen = ["--space", "smoke"] if space == "built-in" else ["--space-file", str(tmp_path / "mine.yaml")]
    proc = start_search(tmp_path, *chosen, "--num-samples", str(NUM_SAMPLES), "--max-epochs", "2",
                        "--seed", "5", "--data-dir", str(tmp_path / "pcam"))
    try:
        deadline = time.monotonic() + 300
        done = {}
        while len(done) < 2:
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no two trials finished in 300 s"
            time.sleep(1)
            # Only read the store once the Tuner runs: the driver has created its tables by then (two
            # processes initialising one sqlite schema at once would race).
            if "== Status ==" in (tmp_path / "first.log").read_text():
                done = finished_children(uri)
        time.sleep(1.5)  # let Ray write its experiment state after those trials
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done = finished_children(uri)
    rows_before = {t: progress_rows(experiment, t) for t in done}
    assert not (tmp_path / "results" / NAME / "leaderboard.csv").exists()  # it really died mid-search

    # Re-running with only --resume finds the newest search and its original settings (space, seed, epochs).
    proc = start_search(tmp_path, "--resume", log="second.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()[-3000:]
    out = (tmp_path / "second.log").read_text()
    assert "resuming search 'resume-test'" in out and "mlflow ui --backend-store-uri" in out

    board = pd.read_csv(tmp_path / "results" / NAME / "leaderboard.csv")
    assert len(board) == NUM_SAMPLES and board["trial_id"].is_unique  # none lost, none doubled
    assert set(done) <= set(board["trial_id"])
    for trial_id, rows in rows_before.items():  # finished before the kill: not trained again
        assert progress_rows(experiment, trial_id) == rows
        assert board.set_index("trial_id").loc[trial_id, "status"] == done[trial_id].data.tags["outcome"]
    assert not board["status"].str.startswith(("interrupted", "pending", "errored")).any()

    mlf = tracking.client(uri)
    exp = mlf.get_experiment_by_name(NAME)
    parents = mlf.search_runs([exp.experiment_id], filter_string=f"tags.{tracking.ROLE_TAG} = 'parent'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    all_runs = mlf.search_runs([exp.experiment_id], max_results=1000)
    assert len(all_runs) == NUM_SAMPLES + 1  # one parent, one child per trial
    kids = tracking.child_runs(mlf, exp.experiment_id, parents[0].info.run_id)
    assert set(kids) == set(board["trial_id"])
    for trial_id, run in kids.items():
        steps = [m.step for m in mlf.get_metric_history(run.info.run_id, "val_auc")]
        assert steps == sorted(set(steps)) == list(range(1, len(steps) + 1))  # no epoch logged twice
        assert run.data.tags["outcome"] == board.set_index("trial_id").loc[trial_id, "status"]
    # The resumed search kept telling the same persisted study: every trial once, none left RUNNING.
    from search import searcher

    study = searcher.load_study(f"sqlite:///{tmp_path / 'results'}/optuna.db", NAME)
    told = [t for t in study.trials if t.user_attrs.get(searcher.OUTCOME_ATTR) != searcher.LOST]
    assert sorted(t.user_attrs[searcher.RAY_TRIAL_ID] for t in told) == sorted(board["trial_id"])
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
    assert all(t.state.name == "FAIL" for t in study.trials if t not in told)
    # The resumed search explains itself from the whole study, trials from before the kill included.
    assert "what mattered most (fANOVA" in out or "parameter importances: need at least" in out
    artifacts = {a.path for a in mlf.list_artifacts(parents[0].info.run_id)}
    assert "intermediate_values.png" in artifacts and "parallel_coordinate.png" in artifacts
    best = json.loads((tmp_path / "results" / NAME / "best_config.json").read_text())
    assert best["parent_run_id"] == parents[0].info.run_id and best["config"]["seed"] == 5
    if space == "file":  # every trial, before and after the kill, drew from the file's range
        assert best["space"] == "mine" and board["lr"].between(1e-3, 2e-2).all()
        assert (tmp_path / "results" / NAME / "space.yaml").read_text() == USER_SPACE
