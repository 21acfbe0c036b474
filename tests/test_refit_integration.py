"""The acceptance paths: a real search then its refit, on the embedded data and on real PCam patches."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


def _cli(module: str, *args: str, env: dict, timeout: int = 900) -> str:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "PCAM_TUNE_CACHE": str(tmp_path / "cache"), "PCAM_TUNE_RESULTS": str(tmp_path / "results"),
            "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}


@pytest.mark.slow
def test_smoke_search_then_refit_writes_a_valid_submission(tmp_path, env):
    _cli("search.run", "--space", "smoke", "--name", "smoke", "--num-samples", "2", env=env)
    best = json.loads((tmp_path / "results" / "smoke" / "best_config.json").read_text())
    # no --name: the newest search; a subsample keeps CI short (the default refit uses every row)
    out = _cli("search.refit_best", "--max-train-samples", "512", env=env)
    sub = pd.read_csv(tmp_path / "results" / "smoke" / "submission.csv", dtype={"id": str})
    sample = pd.read_csv(_sample_submission(best), dtype={"id": str})
    assert sub["id"].tolist() == sample["id"].tolist()
    assert sub["label"].between(0, 1).all() and sub["label"].notna().all()
    refit = json.loads((tmp_path / "results" / "smoke" / "refit.json").read_text())
    assert refit["epochs"] == best["best_epoch"] and refit["trial_id"] == best["trial_id"]
    assert refit["registered_model"] == "pcam-smoke" and "MLflow UI: mlflow ui" in out
    assert refit["test_auc"] is not None  # the synthetic data carries test_labels.csv


def _sample_submission(best: dict) -> Path:
    from datasets.cache import open_cache

    return Path(open_cache(best["cache_path"]).source["data_dir"]) / "sample_submission.csv"


@pytest.mark.slow
def test_refit_on_real_patches_reports_test_auc(pcam_sample_dir, tmp_path, env):
    """A hand-written best config on the 3,200 real training patches; 800 real test patches scored."""
    from datasets.cache import prepare_dataset
    from trainables.train import DEFAULTS

    cache = prepare_dataset(data_dir=str(pcam_sample_dir), cache_dir=str(tmp_path / "cache"), progress=False)
    config = {**DEFAULTS, "backbone": "baseline_bn", "pretrained": False, "lr": 3e-3, "batch_size": 64,
              "input_size": 48, "aug_strength": 0.3, "seed": 0}
    results = tmp_path / "results"
    (results / "real").mkdir(parents=True)
    (results / "real" / "best_config.json").write_text(json.dumps({
        "name": "real", "space": "baseline", "config": config, "trial_id": "hand", "best_val_auc": 0.8,
        "best_epoch": 2, "epochs_run": 2, "status": "completed", "experiment_path": None, "checkpoint_path": None,
        "data_dir": str(pcam_sample_dir), "cache_path": str(cache.path), "data_fingerprint": cache.fingerprint,
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "mlflow_experiment": "real",
        "parent_run_id": None, "child_run_id": None}))
    out = _cli("search.refit_best", "--name", "real", "--test-labels", str(pcam_sample_dir / "test_labels.csv"), env=env)
    refit = json.loads((results / "real" / "refit.json").read_text())
    assert refit["test_labels"] == str(pcam_sample_dir / "test_labels.csv")
    assert 0.6 < refit["test_auc"] <= 1.0, out  # 2 short epochs on 3,200 patches already rank well above chance
    sub = pd.read_csv(results / "real" / "submission.csv", dtype={"id": str})
    assert len(sub) == 800 and np.isfinite(sub["label"]).all()
