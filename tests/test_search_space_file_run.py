"""A real search (Ray Tune + Optuna + ASHA + MLflow) from a space file the user wrote: it runs, keeps its space with
its settings, resumes from that copy, and refuses in one line a file changed since it started."""
from __future__ import annotations

import contextlib
import io
import json

import pandas as pd
import pytest

from datasets.errors import UserError
from search import run as search_run
from search import searcher, settings, tracking

SPACE = """\
# my own space: two trials of one epoch on the synthetic data
name: tiny
description: lr and dropout of baseline_bn on 128 patches
backbones: {fixed: baseline_bn}
pretrained: false
scheduler: {num_samples: 2, max_epochs: 1}
parameters:
  lr: {distribution: log_uniform, low: 1e-3, high: 3e-2}
  dropout: {distribution: uniform, low: 0.0, high: 0.5}
constants: {max_train_samples: 128, batch_size: 64, unfreeze_depth: null, aug_strength: 0.0}
start:
  - {lr: 0.01, dropout: 0.1}
"""


@pytest.fixture(scope="module")
def file_search(ray_local, tmp_path_factory):
    from datasets.synthetic import write_kaggle_layout

    tmp = tmp_path_factory.mktemp("space-file")
    write_kaggle_layout(tmp / "pcam", n=240, seed=0)
    space_file = tmp / "tiny.yaml"
    space_file.write_text(SPACE)
    common = ["--results-dir", str(tmp / "results"), "--cache-dir", str(tmp / "cache")]
    search_run._set_env()
    record = search_run.run_search(search_run.make_plan(
        ["--space-file", str(space_file), "--name", "mine", "--data-dir", str(tmp / "pcam"), "--cpus-per-trial", "1",
         "--max-concurrent", "2", "--seed", "2", *common]), progress=False)
    return tmp, space_file, common, record


def test_a_search_runs_from_a_user_written_file(file_search):
    tmp, space_file, _, record = file_search
    out = tmp / "results" / "mine"
    board = pd.read_csv(out / "leaderboard.csv")
    assert len(board) == 2  # the file's num_samples
    assert {"lr", "dropout"} <= set(board.columns) and board["lr"].between(1e-3, 3e-2).all()
    assert 0.01 in set(board["lr"])  # its starting configuration ran
    assert record["space"] == "tiny" and record["config"]["max_train_samples"] == 128
    assert record["config"]["epochs"] == 1 and record["config"]["pretrained"] is False
    saved = json.loads((out / settings.SETTINGS_FILE).read_text())
    assert saved["space_file"] == str(space_file) and (out / settings.SPACE_COPY).read_text() == SPACE
    mlf = tracking.client(record["tracking_uri"])
    parent = mlf.get_run(record["parent_run_id"])
    assert parent.data.params["space"] == "tiny" and parent.data.params["space_sha256"] == saved["space_sha256"][:12]
    assert "space.yaml" in {a.path for a in mlf.list_artifacts(parent.info.run_id)}


def test_the_search_resumes_with_its_copy_and_refuses_a_changed_file(file_search):
    tmp, space_file, common, record = file_search
    # Resumed without naming the file: the copy kept with the settings is the space (here: the search is over, so
    # Ray restores it, runs nothing more and the leaderboard comes back the same).
    before = pd.read_csv(tmp / "results" / "mine" / "leaderboard.csv")
    plan = search_run.make_plan(["--name", "mine", "--resume", *common])
    assert plan.resume and plan.space.name == "tiny" and plan.space.text == SPACE and plan.num_samples == 2
    again = search_run.run_search(plan, progress=False)
    assert again["trial_id"] == record["trial_id"]
    assert pd.read_csv(tmp / "results" / "mine" / "leaderboard.csv")["trial_id"].tolist() == before["trial_id"].tolist()
    study = searcher.load_study(f"sqlite:///{tmp / 'results'}/optuna.db", "mine")
    assert len(study.trials) == 2

    # The same file again resumes too; an edited one is refused, naming both files and both hashes.
    assert search_run.make_plan(["--space-file", str(space_file), "--name", "mine", *common]).resume
    space_file.write_text(SPACE.replace("high: 3e-2", "high: 1e-1"))
    with pytest.raises(UserError) as e:
        search_run.make_plan(["--space-file", str(space_file), "--name", "mine", *common])
    msg = str(e.value)
    assert "\n" not in msg and f"--space-file {space_file} (sha256 " in msg and "differs from the space" in msg
    assert str(tmp / "results" / "mine" / "space.yaml") in msg and "resume without --space-file" in msg
    saved = json.loads((tmp / "results" / "mine" / settings.SETTINGS_FILE).read_text())
    assert saved["space_sha256"][:12] in msg
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # without the file: the copy, and a note that the file changed
        assert search_run.make_plan(["--name", "mine", "--resume", *common]).space.text == SPACE
    assert f"note: {space_file} changed since search 'mine' started" in out.getvalue()
    with pytest.raises(UserError, match="search 'mine' was started with --space-file .*tiny.yaml; resume it with that "
                                        r"\(or drop --space\)"):
        search_run.make_plan(["--space", "smoke", "--name", "mine", *common])
    copy = tmp / "results" / "mine" / settings.SPACE_COPY
    copy.write_text(SPACE + "# edited\n")
    with pytest.raises(UserError, match=f"{copy} was changed since search 'mine' started"):
        search_run.make_plan(["--name", "mine", "--resume", *common])
    copy.write_text(SPACE)


def test_warm_start_needs_the_same_space_file(file_search, tmp_path):
    tmp, space_file, common, _ = file_search
    other = tmp_path / "tiny.yaml"  # the same name, another range: another space for TPE
    other.write_text(SPACE.replace("low: 1e-3", "low: 1e-4"))
    with pytest.raises(UserError, match=r"--warm-start 'mine' searched another space \(space tiny sha256 \w{12}, .*"
                                        r"than this search \(space tiny sha256 \w{12}"):
        search_run.make_plan(["--space-file", str(other), "--name", "mine2", "--warm-start", "mine", *common])
    other.write_text(SPACE)
    plan = search_run.make_plan(["--space-file", str(other), "--name", "mine2", "--warm-start", "mine", *common])
    assert plan.warm_start["name"] == "mine"
