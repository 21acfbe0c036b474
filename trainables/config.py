"""A trial's config (DEFAULTS + checks) and where and how it runs (device, precision/layout).

The config is what a search samples and what a model file and a checkpoint carry; ``resolve_config`` is the one
place it is checked, so a typo or an out-of-range value is a one-line UserError before any training starts. It
returns a ``ResolvedConfig``: resolved once where a config enters, then passed down (no second check, no second
look-up of the backbone).
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


class ResolvedConfig(dict):
    """A trial's config after ``resolve_config``: DEFAULTS overlaid, every value checked, and its backbone looked up
    in the registry once (``backbone_spec``, a trainables.backbones.Backbone that building the model, its weights
    and the embedding cache use instead of asking the registry again).

    It is produced once where a config enters (train_pcam, fit, predict_proba, load_model, the refit) and passed
    down; ``resolve_config`` hands an already resolved config back as it is. A dict, so every reader (the search,
    JSON, MLflow, ``{**cfg, ...}``) reads it as before; it stays resolved: an assignment is checked as
    resolve_config would check it (a new backbone is looked up), and a key cannot be removed. Files hold
    ``dict(cfg)`` (torch.load with weights_only reads plain dicts only); a pickle (a Ray worker, a deepcopy)
    resolves the plain dict again where it lands.
    """
    __slots__ = ("backbone_spec",)

    def __init__(self, values: dict, backbone_spec):
        super().__init__(values)
        self.backbone_spec = backbone_spec

    def __reduce__(self):
        return resolve_config, (dict(self),)

    def __setitem__(self, key, value) -> None:
        self.update({key: value})

    def update(self, *args, **kwargs) -> None:
        changes = dict(*args, **kwargs)
        unknown = set(changes) - set(self) - _DATA_KEYS
        if unknown:
            raise UserError(f"unknown config key(s) {sorted(unknown)}; valid keys: {', '.join(DEFAULTS)}")
        values = {**self, **changes}
        spec = self.backbone_spec if values["backbone"] == self["backbone"] else get_backbone(values["backbone"])
        _check(values)
        super().update(changes)
        self.backbone_spec = spec

    def replace(self, **changes) -> ResolvedConfig:
        """A new resolved config with ``changes`` checked (this one unchanged; the backbone's registry entry kept
        unless the backbone changes)."""
        new = ResolvedConfig(self, self.backbone_spec)
        new.update(changes)
        return new

    def __ior__(self, other):
        self.update(other)
        return self

    def setdefault(self, key, default=None):
        if key not in self:
            self.update({key: default})
        return self[key]

    def _no_removal(self, *args):
        raise TypeError("a resolved config keeps every key; build a new one with resolve_config({...})")

    __delitem__ = pop = popitem = clear = _no_removal


def resolve_config(config: dict | None) -> ResolvedConfig:
    """DEFAULTS overlaid with ``config``, checked, its backbone looked up: a ResolvedConfig (``config`` itself when
    it is one already). Unknown keys (typos) are a UserError, not ignored."""
    if isinstance(config, ResolvedConfig):
        return config
    config = dict(config or {})
    unknown = set(config) - set(DEFAULTS) - _DATA_KEYS
    if unknown:
        raise UserError(f"unknown config key(s) {sorted(unknown)}; valid keys: {', '.join(DEFAULTS)}")
    cfg = {**DEFAULTS, **config}
    spec = get_backbone(cfg["backbone"])
    _check(cfg)
    return ResolvedConfig(cfg, spec)


def _check(cfg: dict) -> None:
    """The value checks of resolve_config (the backbone is checked by looking it up)."""
    if not 0.0 <= float(cfg["aug_strength"]) <= 1.0:
        raise UserError(f"aug_strength must be in [0, 1], got {cfg['aug_strength']}")
    if int(cfg["epochs"]) < 1 or int(cfg["batch_size"]) < 1:
        raise UserError("epochs and batch_size must be >= 1")
    if cfg["pos_weight"] not in (None, "auto") and not float(cfg["pos_weight"]) > 0:
        raise UserError(f"pos_weight must be None, 'auto' or a positive number, got {cfg['pos_weight']!r}")
    check_precision(cfg["precision"])
    if cfg["head"] not in (None, "linear", "mlp"):
        raise UserError(f"head must be None, 'linear' or 'mlp', got {cfg['head']!r}")


def fast_path(cfg: dict, device: torch.device, training: bool = True) -> FastPath:
    """Precision and layout ``cfg`` runs in on ``device`` (trainables.fastpath has the rule)."""
    return choose(cfg["precision"], cfg["backbone"], device, training)
