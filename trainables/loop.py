"""The training loop: ``fit`` runs a config epoch after epoch (trainables.engine's pass and evaluation), with
seeded resumable epochs, the divergence rule and a callback per epoch; ``best_of`` is the search's objective.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from datasets.errors import UserError
from trainables.config import ResolvedConfig, fast_path, resolve_config
from trainables.device import claim_device, out_of_memory, pick_device
from trainables.engine import (Diverged, SmoothedBCE, batches_per_epoch, epoch_seed, evaluate, make_optimizer,
                               report_diverged, resolve_pos_weight, train_one_epoch)
from trainables.fastpath import reuse_freed_memory
from trainables.models import build_model
from trainables.probe import fit_on_features, uses_cached_features


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


def fit(config: dict, cache, train_idx: np.ndarray, val_idx: np.ndarray | None = None,
        epochs: int | None = None, on_epoch: Callable | None = None, resume: dict | None = None,
        progress: bool = False, stop_epoch: int | None = None, device: torch.device | str | None = None):
    """Train ``config`` on ``train_idx`` (validating on ``val_idx`` when given).

    The learning-rate schedule spans ``epochs`` (default ``config['epochs']``); ``stop_epoch`` ends
    training after that epoch of it, e.g. a refit that follows a trial's schedule to its best epoch.

    ``on_epoch(metrics, state, predictions)`` is called after every epoch: ``state`` is the
    checkpoint dict (None when diverged), ``predictions`` = (labels, probs) or None. ``resume``
    is a checkpoint dict to continue from. Returns (model, history). A non-finite loss ends
    training with a last history entry whose trial_status is "diverged". ``device``: where to train (default:
    ``pick_device()``; a Ray trial passes what Ray assigned it); a CUDA out-of-memory error is raised as
    trainables.device.OutOfGPUMemory (one line: backbone, batch size, what to change).
    """
    cfg = resolve_config(config)  # the caller's own when it is resolved already (train_pcam, the refit)
    if epochs is not None:
        cfg = cfg.replace(epochs=int(epochs))
    train_idx = np.asarray(train_idx)
    if cfg["max_train_samples"] and len(train_idx) > int(cfg["max_train_samples"]):
        rng = np.random.default_rng(int(cfg["seed"]))
        train_idx = np.sort(rng.choice(train_idx, int(cfg["max_train_samples"]), replace=False))
    if len(train_idx) == 0:
        raise UserError("no training rows: the train split is empty")
    labels = cache.labels[train_idx]
    if (labels < 0).any():
        raise UserError("train_idx holds unlabelled rows (label -1); train only on labelled splits")
    if uses_cached_features(cfg):  # head only on a frozen backbone: its features come from the embedding cache
        return fit_on_features(cfg, cache, train_idx, val_idx, on_epoch, resume, stop_epoch, best_of, progress)
    device = claim_device(torch.device(device) if device is not None else pick_device())
    try:
        return _fit(cfg, cache, train_idx, val_idx, on_epoch, resume, progress, stop_epoch, device, labels)
    except torch.cuda.OutOfMemoryError as e:
        raise out_of_memory(cfg, device, e) from None


def _fit(cfg: ResolvedConfig, cache, train_idx, val_idx, on_epoch, resume, progress, stop_epoch, device, labels):
    """fit's epochs on a chosen device (fit turns a CUDA out-of-memory error into its one line)."""
    path = fast_path(cfg, device, training=True)
    reuse_freed_memory()
    torch.manual_seed(int(cfg["seed"]))
    model = build_model(cfg.backbone_spec, bool(cfg["pretrained"]), cfg["unfreeze_depth"], cfg["dropout"])
    model = path.prepare_model(model.to(device))
    criterion = SmoothedBCE(cfg["label_smoothing"], resolve_pos_weight(cfg, labels)).to(device)
    opt, sched = make_optimizer(model, cfg, batches_per_epoch(len(train_idx), int(cfg["batch_size"])))
    scaler = path.grad_scaler()  # fp16 only
    history, start = [], 1
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        history, start = list(resume["history"]), int(resume["epoch"]) + 1
    last = min(int(cfg["epochs"]), int(stop_epoch or cfg["epochs"]))
    for epoch in range(start, last + 1):
        torch.manual_seed(epoch_seed(cfg, epoch))  # dropout masks too
        t0 = time.perf_counter()
        try:
            train_loss, seen = train_one_epoch(model, opt, sched, criterion, cache, train_idx, cfg,
                                               device, epoch, path, progress, scaler)
            train_s = time.perf_counter() - t0
            ev = evaluate(model, criterion, cache, np.asarray(val_idx), cfg, path) \
                if val_idx is not None and len(val_idx) else None
        except Diverged:
            report_diverged(history, best_of, on_epoch, epoch=epoch, lr=float(sched.get_last_lr()[0]),
                            epoch_seconds=time.perf_counter() - t0, fast_path=path.name, device=str(device))
            break
        metrics = {"epoch": epoch, "train_loss": float(train_loss), "lr": float(sched.get_last_lr()[0]),
                   "fast_path": path.name, "device": str(device)}
        preds = None
        if ev is not None:
            preds = (ev.pop("labels"), ev.pop("probs"))
            metrics.update(ev)
        metrics.update(epoch_seconds=time.perf_counter() - t0, images_per_s=seen / train_s,
                       trial_status="completed" if epoch == last else "running")
        history.append(metrics)
        if "val_auc" in metrics:  # the objective so far: what ASHA compares at its rungs and TPE is told
            metrics["best_val_auc"], metrics["best_epoch"] = best_of(history)
        if on_epoch:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "epoch": epoch, "config": dict(cfg), "history": history}
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            on_epoch(metrics, state, preds)
    return model, history
