"""The training function every search trial runs, also usable on its own.

    python -m trainables.train --backbone baseline_bn --epochs 2 [--data-dir DIR] [--lr 1e-3] ...

``train_pcam(config)`` is a Ray Tune function trainable: inside a Tune session it reports the
epoch metrics with a checkpoint every epoch and resumes from ``tune.get_checkpoint()``; outside
one it prints a line per epoch. Batches are fancy-indexed straight out of the decode-once uint8
memmap (datasets.cache) and everything after that - float conversion, augmentation, resizing,
normalisation - happens batch-wise on the training device.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from datasets.defaults import usable_cpus
from datasets.errors import UserError, run_cli
from trainables.augment import augment_batch, dihedral_view
from trainables.fastpath import PRECISIONS, FastPath, check_precision, choose, reuse_freed_memory
from trainables.models import build_model, get_backbone

DEFAULTS: dict = {
    "backbone": "baseline_bn",
    "pretrained": True,         # ignored by the baselines (always from scratch)
    "unfreeze_depth": None,     # None = all stages train
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "batch_size": 128,
    "dropout": 0.3,
    "aug_strength": 0.5,
    "label_smoothing": 0.0,
    "pos_weight": None,         # None, a float, or "auto" = negatives/positives of the train split
    "epochs": 5,
    "warmup_epochs": 0.5,
    "input_size": 96,
    "val_fraction": 0.2,
    "seed": 0,
    "max_train_samples": None,  # subsample the train split (fast searches)
    "precision": "auto",        # auto | fp32 | bf16: see trainables.fastpath
}
# Keys a caller may add besides DEFAULTS: where the data is when no cache_path is given.
_DATA_KEYS = {"data_dir", "cache_dir"}
CHECKPOINT_FILE = "checkpoint.pt"
PREDICTIONS_FILE = "val_predictions.npz"


class Diverged(Exception):
    """The training loss became NaN/inf."""


# --- config, device, threads --------------------------------------------------------------------

def resolve_config(config: dict | None) -> dict:
    """DEFAULTS overlaid with ``config``; unknown keys (typos) are a UserError, not ignored."""
    config = dict(config or {})
    unknown = set(config) - set(DEFAULTS) - _DATA_KEYS
    if unknown:
        raise UserError(f"unknown config key(s) {sorted(unknown)}; valid keys: {', '.join(DEFAULTS)}")
    cfg = {**DEFAULTS, **config}
    get_backbone(cfg["backbone"])
    if not 0.0 <= float(cfg["aug_strength"]) <= 1.0:
        raise UserError(f"aug_strength must be in [0, 1], got {cfg['aug_strength']}")
    if int(cfg["epochs"]) < 1 or int(cfg["batch_size"]) < 1:
        raise UserError("epochs and batch_size must be >= 1")
    if cfg["pos_weight"] not in (None, "auto") and not float(cfg["pos_weight"]) > 0:
        raise UserError(f"pos_weight must be None, 'auto' or a positive number, got {cfg['pos_weight']!r}")
    check_precision(cfg["precision"])
    return cfg


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def fast_path(cfg: dict, device: torch.device, training: bool = True) -> FastPath:
    """Precision and layout ``cfg`` runs in on ``device`` (trainables.fastpath has the rule)."""
    return choose(cfg["precision"], cfg["backbone"], device, training)


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


# --- batches ------------------------------------------------------------------------------------

def get_batch(images: np.ndarray, labels: np.ndarray, idx: np.ndarray, device: torch.device):
    """Rows ``idx`` of the uint8 memmap as (uint8 NHWC images, float labels) on ``device``."""
    idx = np.sort(idx)  # sequential reads from the memmap; order inside a batch is irrelevant
    x = torch.from_numpy(np.ascontiguousarray(images[idx]))
    y = torch.from_numpy(labels[idx].astype(np.float32))
    if device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def to_input(x_u8: torch.Tensor, cfg: dict, aug: bool, g: torch.Generator | None = None) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1], augmented (training) and resized to input_size.

    The memory layout is whatever costs least (FastPath.prepare_input sets the model's).
    """
    x = x_u8.permute(0, 3, 1, 2)
    if aug:
        x = augment_batch(x.contiguous(), float(cfg["aug_strength"]), g)
    else:
        x = x.float().div_(255)
    size = int(cfg["input_size"] or x.shape[-1])
    if size != x.shape[-1]:
        # Augment at native resolution first: upsampling is the expensive part.
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def model_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, criterion,
               path: FastPath) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward (in ``path``'s precision) + loss in fp32. Returns (loss, float logits)."""
    with path.autocast():
        logits = model(x)
    logits = logits.float()
    return criterion(logits, y), logits


class SmoothedBCE(nn.Module):
    """BCE-with-logits with optional label smoothing (towards 0.5) and pos_weight."""

    def __init__(self, label_smoothing: float = 0.0, pos_weight: float | None = None):
        super().__init__()
        self.smoothing = float(label_smoothing)
        self.register_buffer("pos_weight", None if pos_weight is None else torch.tensor(float(pos_weight)))

    def forward(self, logits, y):
        if self.smoothing:
            y = y * (1 - self.smoothing) + 0.5 * self.smoothing
        return F.binary_cross_entropy_with_logits(logits, y, pos_weight=self.pos_weight)


def _pos_weight(cfg: dict, train_labels: np.ndarray) -> float | None:
    pw = cfg["pos_weight"]
    if pw == "auto":
        pos = int((train_labels == 1).sum())
        return float((len(train_labels) - pos) / max(pos, 1))
    return None if pw is None else float(pw)


# --- epochs -------------------------------------------------------------------------------------

def make_optimizer(model: nn.Module, cfg: dict, steps_per_epoch: int):
    """AdamW with linear warm-up then cosine decay, stepped per batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
    total = max(1, int(cfg["epochs"]) * steps_per_epoch)
    warm = int(float(cfg["warmup_epochs"]) * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def batches_per_epoch(n: int, batch_size: int) -> int:
    # A trailing runt (< half a batch) is dropped: BatchNorm statistics of a few images are noise.
    full, rest = divmod(n, batch_size)
    return max(1, full + int(rest > 0 and rest >= batch_size // 2))


def train_one_epoch(model, opt, sched, criterion, cache, train_idx, cfg, device, epoch: int,
                    path: FastPath, progress: bool = False) -> tuple[float, int]:
    """One pass over a seeded permutation of ``train_idx``. Returns (mean loss, images seen)."""
    model.train()
    seed = _epoch_seed(cfg, epoch)
    order = np.random.default_rng(seed).permutation(train_idx)
    g = torch.Generator(device=device).manual_seed(seed)
    bs = int(cfg["batch_size"])
    n_batches = batches_per_epoch(len(order), bs)
    total, seen = torch.zeros((), device=device), 0
    batches = range(n_batches)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc=f"epoch {epoch}", unit="batch", leave=False, file=sys.stderr)
    for b in batches:
        idx = order[b * bs:(b + 1) * bs]
        x_u8, y = get_batch(cache.images, cache.labels, idx, device)
        x = path.prepare_input(to_input(x_u8, cfg, aug=True, g=g))
        loss, _ = model_step(model, x, y, criterion, path)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.detach() * len(idx)
        seen += len(idx)
        # Reading the loss forces a device sync: do it every few steps, not every step. NaN/inf
        # propagate through the sum, so no diverged batch goes unnoticed.
        if b % 16 == 15 or b == n_batches - 1:
            mean = total.item() / seen
            if not math.isfinite(mean):
                raise Diverged(f"non-finite loss at epoch {epoch} batch {b}")
            if progress:
                batches.set_postfix(loss=f"{mean:.4f}")
    return total.item() / seen, seen


def predict_views(model, images: np.ndarray, cfg: dict, idx: np.ndarray | None = None,
                  views: tuple[int, ...] = (0,), batch_size: int | None = None,
                  path: FastPath | None = None) -> np.ndarray:
    """P(tumour) for rows ``idx`` of ``images``, averaged over the given dihedral views.

    ``path``: precision/layout (default: the config's inference choice); ``batch_size``: images per
    forward pass (default: the path's, 64 on CPU). One view of a whole batch is a flip/transpose
    copied into a buffer reused across views, so the only per-batch allocations are the model's own.
    """
    device = next(model.parameters()).device
    path = path or fast_path(cfg, device, training=False)
    batch_size = int(batch_size or path.inference_batch())
    reuse_freed_memory()
    model = path.prepare_model(model.eval())
    idx = np.arange(len(images)) if idx is None else np.asarray(idx)
    out = np.empty(len(idx), dtype=np.float32)
    with torch.inference_mode():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            x = torch.from_numpy(np.ascontiguousarray(images[chunk])).to(device)
            base = path.prepare_input(to_input(x, cfg, aug=False))
            buf = torch.empty_like(base) if len(views) > 1 or views[0] != 0 else None
            probs = torch.zeros(len(chunk), device=device)
            for k in views:
                view = base if k == 0 else buf.copy_(dihedral_view(base, k))
                with path.autocast():
                    logits = model(view)
                probs += torch.sigmoid(logits.float())
            out[s:s + len(chunk)] = (probs / len(views)).cpu().numpy()
    return out


def evaluate(model, criterion, cache, val_idx, cfg, path: FastPath | None = None) -> dict:
    """Validation loss/AUC/accuracy (plain BCE, no smoothing: comparable across configs)."""
    from sklearn.metrics import roc_auc_score
    probs = predict_views(model, cache.images, cfg, val_idx, path=path)
    labels = cache.labels[val_idx].astype(np.float32)
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    loss = float(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean())
    auc = float(roc_auc_score(labels, probs)) if 0 < labels.sum() < len(labels) else 0.5
    acc = float(((probs >= 0.5) == (labels == 1)).mean())
    return {"val_loss": loss, "val_auc": auc, "val_acc": acc, "labels": labels, "probs": probs}


def best_of(history: list[dict]) -> tuple[float, int]:
    """(best val AUC, its epoch) over the healthy epochs of ``history``: the search's objective (search.outcome
    says why best, not last). (nan, 0) when no epoch validated."""
    best, at = float("nan"), 0
    for m in history:
        v = m.get("val_auc")
        if m.get("trial_status") == "diverged" or v is None or v != v:
            continue
        if not best >= v:  # ties keep the earlier epoch
            best, at = float(v), int(m["epoch"])
    return best, at


def _epoch_seed(cfg: dict, epoch: int) -> int:
    # Seed per (seed, epoch): a run resumed at epoch e draws exactly what it would have drawn.
    return int(cfg["seed"]) * 100_003 + epoch


def fit(config: dict, cache, train_idx: np.ndarray, val_idx: np.ndarray | None = None,
        epochs: int | None = None, on_epoch: Callable | None = None, resume: dict | None = None,
        progress: bool = False, stop_epoch: int | None = None):
    """Train ``config`` on ``train_idx`` (validating on ``val_idx`` when given).

    The learning-rate schedule spans ``epochs`` (default ``config['epochs']``); ``stop_epoch`` ends
    training after that epoch of it, e.g. a refit that follows a trial's schedule to its best epoch.

    ``on_epoch(metrics, state, predictions)`` is called after every epoch: ``state`` is the
    checkpoint dict (None when diverged), ``predictions`` = (labels, probs) or None. ``resume``
    is a checkpoint dict to continue from. Returns (model, history). A non-finite loss ends
    training with a last history entry whose trial_status is "diverged".
    """
    cfg = resolve_config(config)
    if epochs is not None:
        cfg["epochs"] = int(epochs)
    train_idx = np.asarray(train_idx)
    if cfg["max_train_samples"] and len(train_idx) > int(cfg["max_train_samples"]):
        rng = np.random.default_rng(int(cfg["seed"]))
        train_idx = np.sort(rng.choice(train_idx, int(cfg["max_train_samples"]), replace=False))
    if len(train_idx) == 0:
        raise UserError("no training rows: the train split is empty")
    labels = cache.labels[train_idx]
    if (labels < 0).any():
        raise UserError("train_idx holds unlabelled rows (label -1); train only on labelled splits")
    device = pick_device()
    path = fast_path(cfg, device, training=True)
    reuse_freed_memory()
    torch.manual_seed(int(cfg["seed"]))
    model = build_model(cfg["backbone"], bool(cfg["pretrained"]), cfg["unfreeze_depth"], cfg["dropout"])
    model = path.prepare_model(model.to(device))
    criterion = SmoothedBCE(cfg["label_smoothing"], _pos_weight(cfg, labels)).to(device)
    opt, sched = make_optimizer(model, cfg, batches_per_epoch(len(train_idx), int(cfg["batch_size"])))
    history, start = [], 1
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        history, start = list(resume["history"]), int(resume["epoch"]) + 1
    last = min(int(cfg["epochs"]), int(stop_epoch or cfg["epochs"]))
    for epoch in range(start, last + 1):
        torch.manual_seed(_epoch_seed(cfg, epoch))  # dropout masks too
        t0 = time.perf_counter()
        try:
            train_loss, seen = train_one_epoch(model, opt, sched, criterion, cache, train_idx, cfg,
                                               device, epoch, path, progress)
        except Diverged:
            metrics = {"epoch": epoch, "val_auc": 0.5, "val_loss": float("nan"), "val_acc": float("nan"),
                       "train_loss": float("nan"), "lr": float(sched.get_last_lr()[0]),
                       "epoch_seconds": time.perf_counter() - t0, "images_per_s": 0.0,
                       "trial_status": "diverged", "fast_path": path.name}
            best, at = best_of(history)
            # Tune needs the metric in every result; the search tells TPE a diverged trial FAILED and ranks it last.
            metrics.update(best_val_auc=0.5 if best != best else best, best_epoch=at)
            history.append(metrics)
            if on_epoch:
                on_epoch(metrics, None, None)
            break
        train_s = time.perf_counter() - t0
        metrics = {"epoch": epoch, "train_loss": float(train_loss), "lr": float(sched.get_last_lr()[0]),
                   "fast_path": path.name}
        preds = None
        if val_idx is not None and len(val_idx):
            ev = evaluate(model, criterion, cache, np.asarray(val_idx), cfg, path)
            preds = (ev.pop("labels"), ev.pop("probs"))
            metrics.update(ev)
        metrics.update(epoch_seconds=time.perf_counter() - t0, images_per_s=seen / train_s,
                       trial_status="completed" if epoch == last else "running")
        history.append(metrics)
        if "val_auc" in metrics:  # the objective so far: what ASHA compares at its rungs and TPE is told
            metrics["best_val_auc"], metrics["best_epoch"] = best_of(history)
        if on_epoch:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "epoch": epoch, "config": cfg, "history": history}
            on_epoch(metrics, state, preds)
    return model, history


# --- the trainable ------------------------------------------------------------------------------

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


def train_pcam(config: dict, cache_path: str | os.PathLike | None = None):
    """Ray Tune function trainable (also the CLI's engine).

    Returns (model, history) when run standalone and None inside Tune (Tune only accepts a
    dict/number/None from a function trainable; everything was reported already).
    ``cache_path``: an existing decode-once cache (what the search passes to every trial, so no
    trial rebuilds it); else ``config['data_dir']`` (None = embedded synthetic data) is prepared.
    """
    cfg = resolve_config(config)
    tune_mode = in_tune_session()
    torch.set_num_threads(trial_cpus())
    path = fast_path(cfg, pick_device(), training=True)
    print(f"{cfg['backbone']}: {path.name} ({path.reason}), {torch.get_num_threads()} thread(s)", flush=True)
    cache = _open_data(cfg, cache_path, progress=not tune_mode)
    from datasets.splits import train_val_split
    train_idx, val_idx = train_val_split(cache, val_fraction=float(cfg["val_fraction"]), seed=int(cfg["seed"]))
    resume = None
    if tune_mode:
        from ray import tune
        ckpt = tune.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                resume = load_checkpoint(d)
    model, history = fit(cfg, cache, train_idx, val_idx,
                         on_epoch=_tune_reporter if tune_mode else _print_epoch,
                         resume=resume, progress=not tune_mode and sys.stderr.isatty())
    return None if tune_mode else (model, history)


# --- inference and model files ------------------------------------------------------------------

def predict_proba(model: nn.Module, images_u8: np.ndarray, config: dict, tta: bool = True,
                  batch_size: int | None = None) -> np.ndarray:
    """P(tumour) per image for uint8 (N, 96, 96, 3) images; TTA = mean over the 8 dihedral views.

    Runs in the config's inference precision/layout (``precision``, trainables.fastpath) with
    ``batch_size`` images per forward (default: 64 on CPU, 256 on GPU).
    """
    cfg = resolve_config(config)
    return predict_views(model, images_u8, cfg, views=tuple(range(8)) if tta else (0,),
                          batch_size=batch_size)


def save_model(path: str | os.PathLike, model: nn.Module, config: dict) -> Path:
    """State dict + full config, written atomically; reload with load_model (weights_only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format": "pcam-tune-model/1", "config": resolve_config(config),
                "state_dict": model.state_dict()}, tmp)
    os.replace(tmp, path)
    return path


def load_model(path: str | os.PathLike, device: torch.device | str | None = None):
    """(model in eval mode, config) from a save_model file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {path} not found")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        cfg = resolve_config(blob["config"])
    except UserError:
        raise
    except Exception as e:  # unpickling errors, truncated files, foreign dicts
        raise UserError(f"{path} is not a pcam-tune model file ({type(e).__name__}); "
                        f"write one with save_model / --out") from None
    return model_from_state(cfg, blob["state_dict"], device or pick_device()), cfg


def model_from_state(config: dict, state_dict: dict, device: torch.device | str | None = None) -> nn.Module:
    """The network of ``config`` holding ``state_dict``, in eval mode (on ``device``, default: where it was built).

    The state dict holds every weight: no need (or network) for ImageNet weights.
    """
    model = build_model(config["backbone"], pretrained=False, unfreeze_depth=config["unfreeze_depth"],
                        dropout=config["dropout"])
    model.load_state_dict(state_dict)
    return (model if device is None else model.to(device)).eval()


def load_checkpoint_model(folder: str | os.PathLike) -> tuple[nn.Module, dict, int]:
    """(model in eval mode on the CPU, config, epoch) of a Tune checkpoint folder (what every trial saves)."""
    state = load_checkpoint(folder)
    return model_from_state(state["config"], state["model"]), state["config"], int(state["epoch"])


# --- CLI ----------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainables.train",
                                description="Train one PCam classifier and print per-epoch validation metrics.")
    p.add_argument("--backbone", default=DEFAULTS["backbone"])
    p.add_argument("--data-dir", default=None, help="Kaggle folder or PCam HDF5 folder (default: embedded synthetic data)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--dropout", type=float, default=DEFAULTS["dropout"])
    p.add_argument("--aug-strength", type=float, default=DEFAULTS["aug_strength"])
    p.add_argument("--unfreeze-depth", type=int, default=None)
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false")
    p.add_argument("--input-size", type=int, default=DEFAULTS["input_size"])
    p.add_argument("--label-smoothing", type=float, default=DEFAULTS["label_smoothing"])
    p.add_argument("--pos-weight", default=None, help="a number or 'auto'")
    p.add_argument("--warmup-epochs", type=float, default=DEFAULTS["warmup_epochs"])
    p.add_argument("--val-fraction", type=float, default=DEFAULTS["val_fraction"])
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--precision", choices=PRECISIONS, default=DEFAULTS["precision"],
                   help="auto (default): bf16 + channels_last where this CPU has native bf16 and the model gains "
                        "from it, else fp32 channels_last; fp32 = the reference path (fp32 NCHW, PyTorch's defaults); bf16 "
                        "forces bf16 (see docs/training.md)")
    p.add_argument("--out", default=None, help="save the trained model here (load with trainables.train.load_model)")
    return p


@run_cli
def main(argv=None) -> None:
    args = vars(get_args_parser().parse_args(argv))
    out = args.pop("out")
    if args["pos_weight"] not in (None, "auto"):
        args["pos_weight"] = float(args["pos_weight"])
    model, history = train_pcam(args)
    if out:
        print(f"saved {save_model(out, model, args)}")
    if history and history[-1]["trial_status"] == "diverged":
        raise UserError(f"training diverged at epoch {history[-1]['epoch']} (non-finite loss); lower --lr")


if __name__ == "__main__":
    sys.exit(main())
