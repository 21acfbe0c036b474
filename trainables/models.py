"""Model registry: the notebooks' baseline CNNs and torchvision transfer backbones.

Every model is a ``PcamNet``: it takes float images in [0, 1] (N, 3, H, W), normalises them the
way its weights expect, and returns one logit per image (N,). Each backbone declares an explicit
list of *stages* (input -> output); ``unfreeze_depth`` = how many trailing stages train, the head
always trains (0 = head only, ``num_stages(name)`` or None = full fine-tune). Frozen BatchNorm
layers stay in eval mode even after ``model.train()``: their running statistics are part of the
pretrained features and must not drift towards PCam batch statistics while their affine weights
are fixed.

The backbones themselves (stages, weights, how to build each) are the registry in trainables.backbones.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from datasets.errors import UserError
from trainables.backbones import MODELS, PCAM_MEAN, PCAM_STD, Backbone, Stages, get_backbone  # noqa: F401 (the public names)
from trainables.heads import head_in_features, make_head, replace_head
from trainables.weights import resolve_weights


def _spec(backbone: str | Backbone) -> Backbone:
    """A backbone's registry entry: as given when it is one already (a ResolvedConfig's ``backbone_spec``)."""
    return backbone if isinstance(backbone, Backbone) else get_backbone(backbone)


def is_pretrainable(name: str | Backbone) -> bool:
    """True when ImageNet weights exist for ``name`` (the baselines always train from scratch)."""
    return _spec(name).weights is not None


def normalization_for(name: str | Backbone, pretrained: bool = True) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) a model of backbone ``name`` normalises its inputs in [0, 1] with, before any model exists
    (build_model stores it; a built model's own is ``model.input_normalization()``)."""
    b = _spec(name)
    # A scratch-trained torchvision net has no ImageNet features to match: use PCam statistics.
    if b.weights is None or not pretrained:
        return tuple(PCAM_MEAN), tuple(PCAM_STD)
    return tuple(b.mean), tuple(b.std)


class PcamNet(nn.Module):
    """A backbone + single-logit head, with input normalisation and stage-wise freezing."""

    def __init__(self, name: str, net: nn.Module, mean, std, unfreeze_depth: int | None, spec: Backbone | None = None):
        super().__init__()
        self.name = name
        self.spec = spec or get_backbone(name)  # its registry entry, asked once
        self.net = net
        # Persistent: a saved model keeps the normalisation it was trained with, even when it is
        # rebuilt without (ImageNet) weights to load its state dict.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self._probe_head = None
        self.set_unfreeze_depth(unfreeze_depth)

    def use_probe_head(self, head: nn.Module) -> None:
        """Replace the backbone's classifier by ``head`` (trainables.heads), inside ``net``."""
        replace_head(self.net, self.head(), head)
        object.__setattr__(self, "_probe_head", head)  # a reference, not a second registered submodule

    def stages(self) -> Stages:
        return self.spec.stages(self.net)

    def head(self) -> nn.Module:
        """The classifier module inside ``net`` (always trains): the backbone's own or a probe head."""
        return self.spec.head(self.net) if self._probe_head is None else self._probe_head

    def set_unfreeze_depth(self, depth: int | None) -> int:
        """Train the head + the last ``depth`` stages (None = all); returns the effective depth."""
        self.net.requires_grad_(True)
        stages = self.stages()
        depth = len(stages) if depth is None else int(depth)
        if depth < 0:
            raise UserError(f"unfreeze_depth must be >= 0 (0 = head only), got {depth}")
        # Search spaces share one depth range across backbones; deeper than the stage count = all.
        depth = min(depth, len(stages))
        frozen = [m for stage in stages[:len(stages) - depth] for m in stage]
        for m in frozen:
            m.requires_grad_(False)
        self._frozen_bn = [bn for m in frozen for bn in m.modules()
                           if isinstance(bn, nn.modules.batchnorm._BatchNorm)]
        self.train(self.training)
        self.unfreeze_depth = depth
        return depth

    def train(self, mode: bool = True):
        super().train(mode)
        for bn in getattr(self, "_frozen_bn", []):
            bn.eval()
        return self

    def input_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """This model's (mean, std) per channel (its saved buffers), for a data path that normalises as it delivers
        (trainables.engine.to_input)."""
        return tuple(self.mean.flatten().tolist()), tuple(self.std.flatten().tolist())

    def forward(self, x: torch.Tensor, normalised: bool = False) -> torch.Tensor:
        """Logits for images in [0, 1]; or for images already normalised with input_normalization()
        (``normalised=True``: the training data path folds it into its colour pass, for free)."""
        return self.net(x if normalised else (x - self.mean) / self.std).squeeze(-1)


@functools.lru_cache(maxsize=None)
def num_stages(name: str) -> int:
    """Number of backbone stages ``unfreeze_depth`` counts (one weightless build, then cached).

    The build happens on the meta device: that skips allocating and initialising the weights (vgg16_bn,
    densenet121: seconds each on a small CPU), so a search space can ask for every backbone's range cheaply.
    """
    b = get_backbone(name)
    with torch.device("meta"):
        return len(b.stages(b.build(None, 0.0)))


def build_model(name: str | Backbone, pretrained: bool = True, unfreeze_depth: int | None = None,
                dropout: float = 0.3, head: str | None = None, head_hidden: int | None = None) -> PcamNet:
    """Build ``name`` with a dropout + single-logit head (``head`` "linear"/"mlp": a probe head, trainables.heads).

    ``pretrained`` loads ImageNet weights from the torch hub cache (see trainables.weights; a
    missing file is a one-line UserError saying where to put it); ignored for the baselines. ``name``: a backbone
    name, or its registry entry (a ResolvedConfig's ``backbone_spec``: the registry is not asked again).
    """
    b = _spec(name)
    use_weights = pretrained and b.weights is not None
    weights = resolve_weights(b.name, b) if use_weights else None
    mean, std = normalization_for(b, use_weights)
    model = PcamNet(b.name, b.build(weights, float(dropout)), mean, std, unfreeze_depth, b)
    if head is not None:
        model.use_probe_head(make_head(head, head_in_features(model.head()), float(dropout), head_hidden))
    return model


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
