"""The Ray Tune adapter: ``train_pcam(config)`` is the function trainable every search trial runs (and the CLI's
engine). Inside a Tune session it reports the epoch metrics with a checkpoint every epoch and resumes from
``tune.get_checkpoint()``; outside one it prints a line per epoch. Also the checkpoint folder's files, and the
trial folder's one file, ``split_rows.npz`` (the rows it trains and validates on: constant for the trial, so
written once beside Ray's params.json, not into every epoch's checkpoint).

Ray pickles the function by reference, so every worker imports this module by name (search.tuner passes
``trainables.train.train_pcam``, the same function re-exported).
"""
from __future__ import annotations

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


def save_checkpoint(folder: str | os.PathLike, state: dict, preds=None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / CHECKPOINT_FILE)
    if preds is not None:
        np.savez(folder / PREDICTIONS_FILE, labels=preds[0], probs=preds[1])
    return folder


def load_checkpoint(folder: str | os.PathLike) -> dict:
    return torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def trial_split(train_idx, val_idx) -> tuple[np.ndarray, np.ndarray]:
    """The trial's rows, recorded once in its folder on the storage (``<experiment>/<trial>/split_rows.npz``, a
    URI storage too), so anyone can check that no trial saw the search's holdout. A resumed trial (a restored
    worker, maybe on another node) finds the file and goes on with the rows it recorded.

    Not in the checkpoints: the rows are constant for the trial, and no reader needs them beside a checkpoint
    (the refit and the holdout scoring take the rows from the search, not from a checkpoint).
    ``get_storage()`` is Ray's developer API (the trial folder on the RunConfig's storage, what Ray persists
    checkpoints through); tests/test_trainables_train.py runs it in a real Tuner with a restored trial.
    """
    import io

    import pyarrow.fs
    from ray import tune

    storage = tune.get_context().get_storage()
    fs, path = storage.storage_filesystem, f"{storage.trial_fs_path}/{SPLIT_FILE}"
    if fs.get_file_info(path).type == pyarrow.fs.FileType.File:
        with fs.open_input_file(path) as f, np.load(io.BytesIO(f.read())) as rows:
            return rows["train_rows"].astype(np.int64), rows["val_rows"].astype(np.int64)
    buf = io.BytesIO()
    np.savez(buf, train_rows=np.asarray(train_idx, np.int32), val_rows=np.asarray(val_idx, np.int32))
    fs.create_dir(storage.trial_fs_path, recursive=True)  # Ray may not have synced the trial's folder there yet
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        from datasets.files import write_atomically
        write_atomically(path, buf.getvalue())
    else:  # an object store's upload is whole or absent
        with fs.open_output_stream(path) as f:
            f.write(buf.getvalue())
    return np.asarray(train_idx), np.asarray(val_idx)


def _tune_reporter(metrics: dict, state: dict | None, preds) -> None:
    import ray
    from ray import tune
    # Which Ray node ran this epoch: on a cluster the leaderboard and MLflow show where each trial ran (and
    # that a trial whose node died continued on another).
    metrics = {**metrics, "node_id": ray.get_runtime_context().get_node_id()}
    if state is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(d, state, preds)
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
    if tune_mode:
        train_idx, val_idx = trial_split(train_idx, val_idx)
    reporter = _tune_reporter if tune_mode else _print_epoch
    model, history = fit(cfg, cache, train_idx, val_idx, on_epoch=reporter,
                         resume=resume, progress=not tune_mode and sys.stderr.isatty(), device=dev)
    return None if tune_mode else (model, history)
