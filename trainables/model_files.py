"""Trained models as files and as predictions: save_model / load_model (weights_only, no pickle), a network
from a config + state dict or from a trial's checkpoint folder, and ``predict_proba`` with test-time augmentation.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from datasets.errors import UserError
from datasets.files import atomic_path
from trainables.config import pick_device, resolve_config
from trainables.engine import predict_views
from trainables.models import build_model
from trainables.trainable import load_checkpoint


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
    with atomic_path(path) as tmp:
        torch.save({"format": "pcam-tune-model/1", "config": dict(resolve_config(config)),
                    "state_dict": model.state_dict()}, tmp)
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
    cfg = resolve_config(config)  # as it is when resolved already (load_model)
    model = build_model(cfg.backbone_spec, pretrained=False, unfreeze_depth=cfg["unfreeze_depth"],
                        dropout=cfg["dropout"], head=cfg["head"], head_hidden=cfg["head_hidden"])
    model.load_state_dict(state_dict)
    return (model if device is None else model.to(device)).eval()


def model_from_checkpoint_state(state: dict) -> nn.Module:
    """The network of a checkpoint dict (what fit hands its on_epoch, and a Tune checkpoint holds), in eval mode."""
    if "head" in state:  # a probe trial checkpoints its head only (trainables.probe)
        from trainables.probe import model_with_head
        return model_with_head(state["config"], state["head"])
    return model_from_state(state["config"], state["model"])


def load_checkpoint_model(folder: str | os.PathLike) -> tuple[nn.Module, dict, int]:
    """(model in eval mode on the CPU, config, epoch) of a Tune checkpoint folder (what every trial saves)."""
    state = load_checkpoint(folder)
    return model_from_checkpoint_state(state), state["config"], int(state["epoch"])
