"""What pcam-tune uses unless told otherwise: the cache root, the results root, the MLflow store, the CPUs.

The one place these defaults live. It sits in the bottom layer so datasets/ (the cache), search/ (results,
tracking) and refit read the same rule without importing each other (or Ray) for it.
"""
from __future__ import annotations

import os
from pathlib import Path


def default_cache_root() -> Path:
    """``$PCAM_TUNE_CACHE``, else ``~/.cache/pcam-tune`` (a ``--cache-dir`` given overrides both)."""
    env = os.environ.get("PCAM_TUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pcam-tune"


def results_root(results_dir: str | os.PathLike | None = None) -> Path:
    """``--results-dir``, else ``$PCAM_TUNE_RESULTS``, else ``./results``; absolute."""
    return Path(results_dir or os.environ.get("PCAM_TUNE_RESULTS") or "results").resolve()


def default_tracking_uri(results_dir: str | os.PathLike, cli_uri: str | None = None) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<results>/mlflow.db`` (absolute path)."""
    return cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(results_dir).resolve()}/mlflow.db"


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (a container's or taskset's limit), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
