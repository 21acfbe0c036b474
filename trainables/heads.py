"""Probe heads: what a frozen backbone's embedding is classified with (config ``head``: "linear" or "mlp").

A probe head replaces the backbone's own classifier inside the network, so a saved model is still one network
(backbone + head) that takes images. It starts with ``FeatureNorm``: the embedding standardised with the mean and
spread of the training features (buffers, saved with the model), so one learning-rate range suits every backbone
whatever the scale of its features.
"""
from __future__ import annotations

import torch
from torch import nn

from datasets.errors import UserError

HEADS = ("linear", "mlp")


class FeatureNorm(nn.Module):
    """(x - mean) / std per feature; the statistics are set once from the training features (set_moments)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def set_moments(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """The training features' per-feature mean and standard deviation (trainables.probe.TrainingFeatures)."""
        self.mean.copy_(mean)
        self.std.copy_(std.clamp_min(1e-4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.flatten(x, 1) - self.mean) / self.std


def make_head(kind: str, dim: int, dropout: float, hidden: int | None = None) -> nn.Sequential:
    """``linear``: norm, dropout, one logit. ``mlp``: norm, Linear(dim, hidden), GELU, dropout, one logit."""
    if kind == "linear":
        return nn.Sequential(FeatureNorm(dim), nn.Dropout(dropout), nn.Linear(dim, 1))
    if kind == "mlp":
        hidden = int(hidden or 256)
        return nn.Sequential(FeatureNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                             nn.Linear(hidden, 1))
    raise UserError(f"config head {kind!r}: choose one of {', '.join(HEADS)} (or None: the backbone's own head)")


def head_in_features(head: nn.Module) -> int:
    """The embedding width a backbone's head takes: its first linear layer's input."""
    for m in head.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
    raise ValueError("the head has no linear layer")


def replace_head(net: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` where ``old`` sits inside ``net`` (net.fc, net.classifier, net.head: whichever it is)."""
    for name, m in net.named_modules():
        if m is old and name:
            parent_name, _, attr = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            setattr(parent, attr, new)
            return
    raise ValueError("head not found in the network")


def reset_head(head: nn.Module) -> None:
    """Fresh initial weights (drawn from the current torch seed); FeatureNorm statistics untouched."""
    for m in head.modules():
        if isinstance(m, nn.Linear):
            m.reset_parameters()
