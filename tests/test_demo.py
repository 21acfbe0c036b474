"""`make demo` (python -m search.demo): search -> refit -> submission, and the closing summary."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


def _demo(tmp_path, *args: str, timeout: int) -> str:
    env = {**os.environ, "PCAM_TUNE_CACHE": str(tmp_path / "cache"), "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run([sys.executable, "-m", "search.demo", "--results-dir", str(tmp_path / "results"), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _closing_lines(out: str, name: str) -> list[str]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"== demo {name!r} done in "))
    return lines[start + 1:start + 5]


def test_demo_ends_with_the_best_config_the_test_auc_and_where_things_are(tmp_path):
    """The demo's plumbing on the smoke space (2 x 2 trial-epochs on 256 patches): the same code path, quick."""
    out = _demo(tmp_path, "--space", "smoke", "--name", "quick", timeout=900)
    results = tmp_path / "results"
    best = json.loads((results / "quick" / "best_config.json").read_text())
    refit = json.loads((results / "quick" / "refit.json").read_text())
    config, auc, submission, ui = _closing_lines(out, "quick")
    assert config.startswith(f"best config (trial {best['trial_id']}, val AUC {best['best_val_auc']:.3f} at epoch "
                             f"{best['best_epoch']}): backbone baseline_bn, lr {best['config']['lr']:.3g}, ")
    lo, hi = refit["test_auc_ci"]
    assert auc.startswith(f"test AUC {refit['test_auc']:.3f} (95 % CI {lo:.3f}-{hi:.3f}) (the winner refit on "
                          f"{refit['n_train']:,} labelled patches for {best['best_epoch']} epoch(s), 8-view TTA)")
    assert submission == f"submission: {results / 'quick' / 'submission.csv'}"
    assert pd.read_csv(results / "quick" / "submission.csv")["label"].between(0, 1).all()
    assert ui.startswith(f"MLflow UI: make ui (= mlflow ui --backend-store-uri sqlite:///{results}/mlflow.db ")
    assert re.search(r"then open http://127\.0\.0\.1:5000/#/experiments/\d+/runs\?workflowType=machine_learning$", ui)


@pytest.mark.slow
def test_make_demo_shows_the_product_doing_its_job(tmp_path):
    """The issue's acceptance on 2 CPU cores: ASHA stops trials, TPE beats its start-up trials, test AUC >= 0.90."""
    out = _demo(tmp_path, timeout=3600)
    board = pd.read_csv(tmp_path / "results" / "demo" / "leaderboard.csv")
    assert len(board) == 12 and board["status"].str.startswith("stopped by ASHA").sum() >= 4
    assert re.search(r"^TPE: best of its 3 random start-up trials \d\.\d+, best of the \d+ trials it proposed "
                     r"\d\.\d+ \(better\)$", out, re.M), out[-3000:]
    auc = json.loads((tmp_path / "results" / "demo" / "refit.json").read_text())["test_auc"]
    assert auc >= 0.90, _closing_lines(out, "demo")
