"""The Ray Tune adapter: ``train_pcam(config)`` is the function trainable every search trial runs (and the CLI's
engine). Inside a Tune session it reports the epoch metrics with a checkpoint every epoch and resumes from
``tune.get_checkpoint()``; outside one it prints a line per epoch. Also the checkpoint folder's files.

Ray pickles the function by reference, so every worker imports this module by name (search.tuner passes
``trainables.train.train_pcam``, the same function re-exported).
"""
from __future__ import annotations

import functools
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from datasets.defaults import usable_cpus
from trainables.config import fast_path, resolve_config
from trainables.device import trial_device
from trainables.loop import fit

CHECKPOINT_FILE = "checkpoint.pt"
PREDICTIONS_FILE = "val_predictions.npz"
SPLIT_FILE = "split_rows.npz"  # train_rows, val_rows (cache rows, int32): what the trial trained and validated on


def in_tune_session() -> bool:
    """True inside a Ray Tune trial (public API: the Tune context has a trial id only there)."""
    import warnings

    try:
        from ray import tune
    except ImportError:
        return False
    with warnings.catch_warnings():  # outside a trial Ray warns that get_trial_id is meant for Tune functions
        warnings.simplefilter("ignore")
        return tune.get_context().get_trial_id() is not None


def trial_cpus() -> int:
    """CPUs this process may use: the trial's Ray resources, else the affinity mask.

    Ray runs trials side by side in one machine; each must stick to the CPUs it was given, or
    N trials x all-core thread pools thrash the machine.
    """
    if in_tune_session():
        import ray
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpus:
            return max(1, int(cpus))
    return usable_cpus()


def _open_data(cfg: dict, cache_path, progress: bool):
    from datasets.cache import open_cache, prepare_dataset
    if cache_path is not None:
        return open_cache(cache_path)
    return prepare_dataset(cfg.get("data_dir"), cfg.get("cache_dir"), progress=progress)


def save_checkpoint(folder: str | os.PathLike, state: dict, preds=None, split=None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / CHECKPOINT_FILE)
    if preds is not None:
        np.savez(folder / PREDICTIONS_FILE, labels=preds[0], probs=preds[1])
    if split is not None:  # so anyone can check that no trial saw the search's holdout
        np.savez(folder / SPLIT_FILE, train_rows=np.asarray(split[0], np.int32), val_rows=np.asarray(split[1], np.int32))
    return folder


def load_checkpoint(folder: str | os.PathLike) -> dict:
    return torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def _tune_reporter(metrics: dict, state: dict | None, preds, split=None) -> None:
    import ray
    from ray import tune
    # Which Ray node ran this epoch: on a cluster the leaderboard and MLflow show where each trial ran (and
    # that a trial whose node died continued on another).
    metrics = {**metrics, "node_id": ray.get_runtime_context().get_node_id()}
    if state is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(d, state, preds, split)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def _print_epoch(metrics: dict, state, preds) -> None:
    keys = ["val_auc", "val_loss", "val_acc", "train_loss", "lr"]
    parts = [f"{k} {metrics[k]:.4g}" for k in keys if k in metrics]
    print(f"epoch {metrics['epoch']:3d}  " + "  ".join(parts)
          + f"  {metrics['epoch_seconds']:.1f}s  {metrics['images_per_s']:.0f} img/s  {metrics['trial_status']}",
          flush=True)


def train_pcam(config: dict, cache_path: str | os.PathLike | None = None, device: str = "auto",
               holdout_rows=None):
    """Ray Tune function trainable (also the CLI's engine).

    Returns (model, history) when run standalone and None inside Tune (Tune only accepts a
    dict/number/None from a function trainable; everything was reported already).
    ``cache_path``: an existing decode-once cache (what the search passes to every trial, so no
    trial rebuilds it); else ``config['data_dir']`` (None = embedded synthetic data) is prepared.
    ``device`` (auto | cpu | cuda | cuda:N) outside Tune; inside, the device is what Ray assigned the trial
    (trainables.device: no GPU assigned = the CPU, even on a GPU host; a GPU fraction caps its memory).
    ``holdout_rows``: the search's untouched holdout (datasets.splits.holdout_split), left out of both the
    training and the validation split.
    """
    cfg = resolve_config(config)
    tune_mode = in_tune_session()
    torch.set_num_threads(trial_cpus())
    dev = trial_device(device, in_ray_trial=tune_mode)
    path = fast_path(cfg, dev, training=True)
    print(f"{cfg['backbone']}: {path.name} on {dev} ({path.reason}), {torch.get_num_threads()} thread(s)",
          flush=True)
    cache = _open_data(cfg, cache_path, progress=not tune_mode)
    from datasets.splits import train_val_split
    train_idx, val_idx = train_val_split(cache, val_fraction=float(cfg["val_fraction"]), seed=int(cfg["seed"]),
                                         exclude=holdout_rows)
    resume = None
    if tune_mode:
        from ray import tune
        ckpt = tune.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                resume = load_checkpoint(d)
    reporter = functools.partial(_tune_reporter, split=(train_idx, val_idx)) if tune_mode else _print_epoch
    model, history = fit(cfg, cache, train_idx, val_idx, on_epoch=reporter,
                         resume=resume, progress=not tune_mode and sys.stderr.isatty(), device=dev)
    return None if tune_mode else (model, history)
