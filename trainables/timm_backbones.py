"""Any timm model as a backbone: ``timm/<model>`` (timm's registry, weights from its hub repository) and
``hf-hub:<org>/<repo>`` (a hub repository whose config.json names a timm architecture: the pathology foundation
models). timm builds the network (``timm.create_model(..., num_classes=0)``: the pooled embedding), its pretrained
config gives the input size and normalisation; this module adds the single-logit head and the stages.

- Input size: a model with a fixed input size (ViTs: ``fixed_input_size`` in its pretrained config) gets the 96 px
  patches resized to its size inside the network, so a saved model resizes too; CNNs take 96 px as is. The resize
  uses the model's own interpolation (``pretrained_cfg["interpolation"]``: bicubic for most of timm's weights, what
  they were trained with), bilinear when its config names none (or one torch's interpolate lacks).
- Stages (what ``unfreeze_depth`` counts, from the top): timm's own coarse parameter groups
  (``model.group_matcher(coarse=True)``): the stem, then each stage of a CNN or each block of a ViT, the final
  norm with the last one.

trainables.backbones wraps ``describe(name)`` into its ``Backbone``; this module does not import it.
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

from datasets.errors import UserError
from trainables.hub import CONFIG_FILE, HubModel, hub_model, is_hub_name, local_config  # noqa: F401 (is_hub_name: the public test)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# Extra create_model arguments the foundation models' cards give (classes config.json cannot hold). Taken from
# the model cards; their weights were not available to test here (docs/training.md).
def _hub_kwargs(repo_id: str) -> dict:
    from timm.layers import SwiGLUPacked
    known = {
        "MahmoodLab/UNI2-h": dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5,
                                  embed_dim=1536, mlp_ratio=2.66667 * 2, no_embed_class=True,
                                  mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, reg_tokens=8, dynamic_img_size=True),
        "paige-ai/Virchow2": dict(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU),
        "bioptimus/H-optimus-0": dict(init_values=1e-5, dynamic_img_size=False),
    }
    return known.get(repo_id, {})


class TimmNet(nn.Module):
    """A timm model's pooled embedding (``features``) + dropout and a single-logit linear layer (``head``)."""

    def __init__(self, features: nn.Module, dropout: float, input_size: int | None):
        super().__init__()
        self.features = features
        self.input_size = input_size  # None: the model takes any size (96 px as is)
        self.interpolation = interpolation(features)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(features.num_features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_size and x.shape[-1] != self.input_size:
            corners = None if self.interpolation == "nearest" else False
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode=self.interpolation,
                              align_corners=corners)
        return self.head(self.features(x))


def interpolation(model: nn.Module) -> str:
    """The resize a timm model's weights were trained with (its pretrained config, also on a model built without
    weights); bilinear when the config names none or one F.interpolate lacks (timm's "random", "lanczos")."""
    return _mode(getattr(model, "pretrained_cfg", None) or {})


def _mode(pretrained_cfg: dict) -> str:
    mode = pretrained_cfg.get("interpolation")
    return mode if mode in ("nearest", "bilinear", "bicubic") else "bilinear"


def resize(name: str) -> str | None:
    """How the network of a timm/hf-hub backbone resizes the patches (its interpolation; None: it takes them as
    they are), without building it: the embedding cache keys features on it."""
    cfg = _pretrained_cfg(hub_model(name))
    return _mode(cfg) if cfg.get("fixed_input_size") and cfg.get("input_size") else None


def _pretrained_cfg(m: HubModel) -> dict:
    """timm's pretrained config of the model (timm/ names: its registry; hf-hub: the repository's config.json)."""
    import timm
    if m.timm_name is not None:
        cfg = timm.models.get_pretrained_cfg(m.timm_name) if "." in m.timm_name else \
            timm.models.get_pretrained_cfg(m.timm_name.split(".")[0])
        return cfg.to_dict() if cfg is not None else {}
    path = local_config(m)
    if path is None:
        return {}
    cfg = json.loads(path.read_text())
    if not cfg.get("architecture"):  # e.g. owkin/phikon-v2: a transformers model (model_type, architectures)
        raise UserError(f"{m.name}: {path} names no timm architecture (a transformers or other library's model); "
                        f"only repositories timm can load (a config.json with \"architecture\") are supported")
    return {**cfg.get("pretrained_cfg", {}), "architecture": cfg.get("architecture")}


def _create(m: HubModel, weights) -> nn.Module:
    """timm.create_model from the local weights file (or random), then without its classifier (the pooled embedding).

    The model is built with its pretrained classifier so timm loads the file strictly (with ``num_classes=0`` timm
    drops the classifier's keys and loads non-strictly: a file of another model would pass), then
    ``reset_classifier(0)``.
    """
    import timm
    if m.timm_name is not None:
        kw = {"pretrained_cfg_overlay": {"file": str(weights)}} if weights is not None else {}
        model = timm.create_model(m.timm_name, pretrained=weights is not None, **kw)
    else:
        config = local_config(m)
        if config is None:
            raise UserError(f"{m.name}: its {CONFIG_FILE} (the architecture) is not on this machine; the search "
                            f"downloads it before it starts, or download it from {m.page}/tree/main and "
                            f"`python -m trainables.weights import model.safetensors --backbone {m.name} "
                            f"--config config.json`")
        folder = weights.parent if weights is not None else config.parent
        if weights is not None and not (folder / CONFIG_FILE).is_file():
            raise UserError(f"{m.name}: {weights} has no {CONFIG_FILE} beside it; import both files again")
        model = timm.create_model(f"local-dir:{folder}", pretrained=weights is not None, **_hub_kwargs(m.repo_id))
    model.reset_classifier(0)
    return model


def _stages(net: TimmNet) -> list[list[nn.Module]]:
    """timm's coarse parameter groups as module lists: a parameter's owning module whole when all its parameters
    are in the group (BatchNorm, timm's BatchNormAct2d: a frozen one then stays in eval mode), else the parameter
    alone (a ViT's cls token, position embedding) in a ParameterList holding the same Parameter objects
    (requires_grad_ on it reaches them)."""
    from timm.models import group_parameters
    model = net.features
    groups = group_parameters(model, model.group_matcher(coarse=True))
    modules = dict(model.named_modules())
    stages = []
    for _, names in sorted(groups.items()):
        wanted, whole, loose, seen = set(names), [], [], set()
        for pname in names:
            owner, _, attr = pname.rpartition(".")
            if owner in seen:
                continue
            mod = modules[owner]
            if owner and {f"{owner}.{n}" for n, _ in mod.named_parameters()} <= wanted:
                seen.add(owner)
                whole.append(mod)
            else:
                loose.append(getattr(mod, attr))
        stages.append(whole + ([nn.ParameterList(loose)] if loose else []))
    return [s for s in stages if s]


def describe(name: str) -> dict:
    """The keyword arguments of trainables.backbones.Backbone for a timm/hf-hub backbone name."""
    m = hub_model(name)
    cfg = _pretrained_cfg(m)
    size = int(cfg["input_size"][-1]) if cfg.get("fixed_input_size") and cfg.get("input_size") else None

    def build(weights, dropout: float) -> nn.Module:
        return TimmNet(_create(m, weights), dropout, size)

    return dict(build=build, stages=_stages, head=lambda net: net.head,
                weights=(m.repo_id or None), mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
                std=tuple(cfg.get("std", IMAGENET_STD)))
