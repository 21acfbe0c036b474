"""A trial's config (DEFAULTS + checks) and where and how it runs (device, precision/layout).

The config is what a search samples and what a model file and a checkpoint carry; ``resolve_config`` is the one
place it is checked, so a typo or an out-of-range value is a one-line UserError before any training starts.
"""
from __future__ import annotations

import torch

from datasets.errors import UserError
from trainables.device import pick_device  # noqa: F401 (the rule lives with the device's other settings)
from trainables.fastpath import FastPath, check_precision, choose
from trainables.models import get_backbone

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
    "precision": "auto",        # auto | fp32 | bf16 | fp16: see trainables.fastpath
    "head": None,               # None = the backbone's own head; "linear" | "mlp": a probe head (trainables.heads)
    "head_hidden": 256,         # the mlp head's hidden width
}
# Keys a caller may add besides DEFAULTS: where the data is when no cache_path is given.
_DATA_KEYS = {"data_dir", "cache_dir"}


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
    if cfg["head"] not in (None, "linear", "mlp"):
        raise UserError(f"head must be None, 'linear' or 'mlp', got {cfg['head']!r}")
    return cfg


def fast_path(cfg: dict, device: torch.device, training: bool = True) -> FastPath:
    """Precision and layout ``cfg`` runs in on ``device`` (trainables.fastpath has the rule)."""
    return choose(cfg["precision"], cfg["backbone"], device, training)
