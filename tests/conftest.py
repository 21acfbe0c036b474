"""Shared fixtures: the real PCam sample beside the repo, and isolated cache/results folders."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

REPO = Path(__file__).resolve().parents[1]
# Test doubles (tests/support: the toy trainable) are imported as tests.support.*, here and in the Ray workers a
# test starts (they unpickle a trainable by its module's name): the repository root on sys.path and on
# $PYTHONPATH, which the workers inherit, wherever pytest was started from.
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))
if str(REPO) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p)
PCAM_SAMPLE = Path(os.environ.get("PCAM_SAMPLE_DIR", REPO.parent / "shared" / "pcam_sample"))


@pytest.fixture(scope="session")
def pcam_sample_dir() -> Path:
    """The 4,000 real Kaggle patches in ../shared/pcam_sample (never copied into the repo)."""
    if not (PCAM_SAMPLE / "train_labels.csv").is_file():
        pytest.skip(f"real PCam sample not found at {PCAM_SAMPLE} (set PCAM_SAMPLE_DIR, or run in the dev/CI checkout with ../shared)")
    return PCAM_SAMPLE


@pytest.fixture(autouse=True)
def _restore_mlflow_tracking_uri():
    """mlflow.set_tracking_uri exports $MLFLOW_TRACKING_URI; keep one test's store from leaking into the next."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if os.environ.get("MLFLOW_TRACKING_URI") != before:
        import mlflow

        mlflow.set_tracking_uri(before)


@pytest.fixture(scope="module")
def ray_local():
    """A local 2-CPU Ray for a test module's real Tuner runs (left alone when one is already up)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    if started:
        ray.shutdown()
