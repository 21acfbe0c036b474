"""Named search spaces, kept as data: a define-by-run Optuna function plus a few defaults each.

A space is an Optuna define-by-run function (``trial`` -> constants) because the interesting spaces are
conditional: the unfreeze depth only means something for a pretrained torchvision backbone, and its
range depends on how many stages that backbone has. Ray's ``OptunaSearch`` calls the function once per
trial; every ``trial.suggest_*`` becomes a config key, and the returned dict adds the constants.

The functions are module-level and bound with ``functools.partial`` so the searcher pickles into the
experiment checkpoint, which is what lets ``Tuner.restore`` bring TPE back exactly where it was.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

from datasets.errors import UserError

DEFAULT_BASELINE = "baseline_bn"


@dataclass(frozen=True)
class SpaceOptions:
    """What the CLI lets the user change about a space."""

    backbones: tuple[str, ...] | None = None  # --backbones a,b,c (None: the space's own choice)
    pretrained: bool = True  # --no-pretrained turns it off
    backbone: str | None = None  # --backbone (finetune)
    max_epochs: int = 5
    seed: int = 0
    precision: str = "auto"  # --precision: every trial's config["precision"] (trainables.fastpath)


@dataclass(frozen=True)
class Space:
    name: str
    description: str
    define: Callable[..., dict]  # define(trial, backbones, opts) -> constants
    # The config keys ``define`` draws (its trial.suggest_* names), in the live table's column order;
    # "unfreeze_depth" only where a pretrained backbone can draw it (see searched_keys).
    searched: tuple[str, ...]
    # Defaults the CLI uses unless overridden; the smoke space keeps CI and the CPU demo short.
    num_samples: int = 16
    max_epochs: int = 5
    grace_period: int = 1
    reduction_factor: int = 2
    constants: dict = field(default_factory=dict)
    searches_backbone: bool = True  # honours --backbones
    # Trials train a head on the embedding cache (trainables.embeddings): the driver computes it before Ray starts.
    cached_features: bool = False
    # Known-good configurations evaluated first (Ray's points_to_evaluate), so a search is never worse than its
    # documented default: trainables.config.DEFAULTS per backbone; unfreeze_depth "all" = every stage.
    start: tuple[dict, ...] = ()


def _models():
    # Imported lazily: `--list-spaces` and option errors should not pay for importing torch.
    from trainables import models

    return models


def baseline_backbones() -> list[str]:
    m = _models()
    return [n for n in m.MODELS if not m.is_pretrainable(n)]


def pretrainable_backbones() -> list[str]:
    m = _models()
    return [n for n in m.MODELS if m.is_pretrainable(n)]


def _suggest_unfreeze(trial, backbone: str, opts: SpaceOptions) -> dict:
    """Unfreeze depth exists only for a pretrained backbone; otherwise every stage trains (None)."""
    m = _models()
    if not (opts.pretrained and m.is_pretrainable(backbone)):
        return {"unfreeze_depth": None}
    # The range depends on the backbone (Optuna allows a dynamic int range); with the multivariate, grouped
    # TPE sampler the depth is modelled jointly with the backbone choice that made it exist.
    # 0 = head only (a linear probe on ImageNet features) .. all stages.
    return {"unfreeze_depth": trial.suggest_int("unfreeze_depth", 0, m.num_stages(backbone))}


def _common(trial, lr_range: tuple[float, float]) -> None:
    trial.suggest_float("lr", *lr_range, log=True)
    trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)
    trial.suggest_float("aug_strength", 0.0, 1.0)


_DEFAULT_POINT = {"lr": 1e-3, "weight_decay": 1e-4, "aug_strength": 0.5}  # trainables.config.DEFAULTS
_PROBE_POINT = {"lr": 1e-3, "weight_decay": 1e-4}  # the usual linear probe: a plain head, no dropout


def start_points(space: Space, backbones: tuple[str, ...], opts: SpaceOptions) -> list[dict]:
    """The space's starting configurations for this search, in the names its define-by-run function suggests:
    those of the search's backbones (a finetune point takes --backbone), unfreeze depth only where drawn."""
    m = _models()
    points = []
    for p in space.start:
        p = dict(p)
        backbone = p.get("backbone", backbones[0])
        if space.searches_backbone and backbone not in backbones:
            continue
        if p.get("unfreeze_depth") == "all":
            if opts.pretrained and m.is_pretrainable(backbone):
                p["unfreeze_depth"] = m.num_stages(backbone)
            else:
                del p["unfreeze_depth"]
        if not space.searches_backbone or space.name == "finetune":
            p.pop("backbone", None)
        else:
            p["backbone"] = backbone  # a point without one starts on the search's first backbone
        points.append(p)
    return points


def define_backbones(trial, backbones: tuple[str, ...], opts: SpaceOptions) -> dict:
    backbone = trial.suggest_categorical("backbone", list(backbones))
    _common(trial, (1e-4, 1e-2))
    trial.suggest_categorical("batch_size", [32, 64, 128])
    return {"pretrained": opts.pretrained, **_suggest_unfreeze(trial, backbone, opts)}


def define_baseline(trial, backbones: tuple[str, ...], opts: SpaceOptions) -> dict:
    trial.suggest_categorical("backbone", list(backbones))
    _common(trial, (3e-4, 3e-2))
    trial.suggest_float("dropout", 0.0, 0.5)
    return {"pretrained": False, "unfreeze_depth": None}


def define_finetune(trial, backbones: tuple[str, ...], opts: SpaceOptions) -> dict:
    (backbone,) = backbones
    _common(trial, (1e-5, 3e-3))
    return {"backbone": backbone, "pretrained": True, **_suggest_unfreeze(trial, backbone, opts)}


def define_probe(trial, backbones: tuple[str, ...], opts: SpaceOptions) -> dict:
    """A head on the frozen backbone's cached features (unfreeze_depth 0): linear, or an MLP of a searched width."""
    trial.suggest_categorical("backbone", list(backbones))
    mlp = trial.suggest_categorical("head", ["linear", "mlp"]) == "mlp"
    if mlp:
        trial.suggest_int("head_hidden", 64, 512, log=True)
    trial.suggest_float("dropout", 0.0, 0.5)
    trial.suggest_float("lr", 1e-4, 3e-2, log=True)
    trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True)
    return {"pretrained": opts.pretrained, "unfreeze_depth": 0, **({} if mlp else {"head_hidden": None})}


def define_demo(trial, backbones: tuple[str, ...], opts: SpaceOptions) -> dict:
    _common(trial, (1e-4, 1e-2))
    return {"backbone": backbones[0], "pretrained": False, "unfreeze_depth": None}


def define_smoke(trial, backbones: tuple[str, ...], opts: SpaceOptions) -> dict:
    trial.suggest_float("lr", 1e-3, 3e-2, log=True)
    trial.suggest_float("aug_strength", 0.0, 1.0)
    return {"backbone": backbones[0], "pretrained": False, "unfreeze_depth": None}


SPACES: dict[str, Space] = {
    s.name: s
    for s in [
        Space("backbones", "backbone choice (baseline_bn + torchvision) x lr, weight decay, unfreeze depth "
              "(pretrained only), augmentation, batch size", define_backbones,
              ("backbone", "lr", "weight_decay", "aug_strength", "unfreeze_depth", "batch_size"), num_samples=24,
              max_epochs=8, grace_period=2, reduction_factor=3,
              start=({"backbone": "mobilenet_v2", **_DEFAULT_POINT, "batch_size": 128, "unfreeze_depth": "all"},
                     {"backbone": DEFAULT_BASELINE, **_DEFAULT_POINT, "batch_size": 128})),
        Space("baseline", "baseline CNNs from scratch: lr, weight decay, augmentation, dropout", define_baseline,
              ("backbone", "lr", "weight_decay", "aug_strength", "dropout"), num_samples=16, max_epochs=8,
              grace_period=2, reduction_factor=3, start=({"backbone": DEFAULT_BASELINE, **_DEFAULT_POINT, "dropout": 0.3},)),
        Space("finetune", "one pretrained backbone (--backbone): unfreeze depth, lr, weight decay, augmentation",
              define_finetune, ("lr", "weight_decay", "aug_strength", "unfreeze_depth"), num_samples=16, max_epochs=6,
              grace_period=1, reduction_factor=3, start=({**_DEFAULT_POINT, "unfreeze_depth": "all"},)),
        # Seconds a trial once the features are cached: hundreds of trials, ASHA over head epochs (rungs 1, 3, 9).
        Space("probe", "linear/MLP head on frozen features (embedding cache; default --backbones mobilenet_v2; "
              "timm/... and hf-hub:... too): head, hidden width, dropout, lr, weight decay", define_probe,
              ("backbone", "head", "head_hidden", "dropout", "lr", "weight_decay"), num_samples=400, max_epochs=12,
              grace_period=1, reduction_factor=3, constants={"batch_size": 256, "aug_strength": 1.0},
              cached_features=True, start=({"head": "linear", "dropout": 0.0, **_PROBE_POINT},)),
        # `make demo` on 2 CPU cores in minutes. Batches of 16: on 512 patches an epoch is 32 steps, enough for
        # the first epoch's AUC to tell learning rates apart (batches of 64 give 8 steps: noise), so ASHA's cut
        # after epoch 1 (keep the top third) means something; 12 trials give TPE 9 after its 3 random ones.
        Space("demo", "the CPU demo (make demo): baseline_bn on 512 training patches, batches of 16: lr, weight "
              "decay, augmentation; ASHA keeps 1/3 after epoch 1 of 3", define_demo,
              ("lr", "weight_decay", "aug_strength"), num_samples=12, max_epochs=3, grace_period=1, reduction_factor=3,
              constants={"max_train_samples": 512, "batch_size": 16}, searches_backbone=False),
        Space("smoke", "tiny CPU demo/test: baseline_bn on 256 training patches, lr and augmentation, 2 epochs",
              define_smoke, ("lr", "aug_strength"), num_samples=4, max_epochs=2, grace_period=1, reduction_factor=2,
              constants={"max_train_samples": 256, "batch_size": 64}, searches_backbone=False),
    ]
}


def get_space(name: str) -> Space:
    if name not in SPACES:
        raise UserError(f"unknown --space {name!r}; choose one of: {', '.join(SPACES)} (see --list-spaces)")
    return SPACES[name]


def list_spaces() -> str:
    width = max(map(len, SPACES))
    return "\n".join(f"{s.name:<{width}}  {s.description}" for s in SPACES.values())


DEFAULT_PROBE = "mobilenet_v2"  # the backbone whose ImageNet weights install offline (make install)


def _is_hub_name(name: str) -> bool:
    from trainables.hub import is_hub_name

    return is_hub_name(name)


def resolve_backbones(space: Space, opts: SpaceOptions) -> tuple[str, ...]:
    """The backbones a space will actually search, after --backbones / --backbone; checks every name
    (timm/<model> and hf-hub:<org>/<repo> names wherever pretrained backbones are allowed)."""
    known = list(_models().MODELS)
    pretrainable = pretrainable_backbones()
    baseline_list = baseline_backbones()

    def check(names, allowed, option):
        for n in names:
            if allowed is not baseline_list and _is_hub_name(n):
                _models().get_backbone(n)  # an unknown timm model is one line now, not in a trial
                continue
            if n not in allowed:
                raise UserError(f"unknown backbone {n!r} in {option} for --space {space.name}; "
                                f"choose from: {', '.join(allowed)}")

    if space.name == "finetune":
        if not opts.backbone:
            raise UserError("--space finetune needs --backbone NAME; choose from: " + ", ".join(pretrainable))
        check([opts.backbone], pretrainable, "--backbone")
        if not opts.pretrained:
            raise UserError("--space finetune fine-tunes pretrained weights; drop --no-pretrained "
                            "(or use --space backbones --no-pretrained to train from scratch)")
        return (opts.backbone,)
    if opts.backbone:
        raise UserError(f"--backbone is for --space finetune; with --space {space.name} use --backbones a,b,c")
    if not space.searches_backbone:
        if opts.backbones:
            raise UserError(f"--space {space.name} always uses {DEFAULT_BASELINE}; "
                            "use --space backbones --backbones ... instead")
        return (DEFAULT_BASELINE,)
    allowed = baseline_list if space.name == "baseline" else pretrainable if space.cached_features else known
    if opts.backbones:
        check(opts.backbones, allowed, "--backbones")
        return tuple(dict.fromkeys(opts.backbones))  # keep order, drop repeats
    if space.name == "baseline":
        return tuple(allowed)
    if space.cached_features:
        return (DEFAULT_PROBE,)
    return (DEFAULT_BASELINE, *pretrainable)


def pretrained_backbones_used(space: Space, backbones: tuple[str, ...], opts: SpaceOptions) -> list[str]:
    """Backbones whose ImageNet weights the search will load (for the pre-flight weights check)."""
    if not opts.pretrained or space.name in ("baseline", "smoke", "demo"):
        return []
    pretrainable = set(pretrainable_backbones())
    return [b for b in backbones if b in pretrainable or _is_hub_name(b)]


def define_by_run(space: Space, backbones: tuple[str, ...], opts: SpaceOptions) -> Callable[[Any], dict]:
    """The Optuna define-by-run function for this search: the space plus the search-wide constants."""
    constants = {**space.constants, "epochs": opts.max_epochs, "seed": opts.seed, "precision": opts.precision}
    return functools.partial(_define_with_constants, space.define, backbones, opts, constants)


def _define_with_constants(define, backbones, opts, constants, trial) -> dict:
    return {**constants, **define(trial, backbones, opts)}


def searched_keys(space: Space, backbones: tuple[str, ...], opts: SpaceOptions) -> list[str]:
    """The keys this search draws (the rest of a config is constant): the space's declared ``searched``, less
    unfreeze_depth when no backbone of the search can draw it (from scratch, or no pretrainable backbone)."""
    m = _models()
    depth_drawn = opts.pretrained and any(m.is_pretrainable(b) for b in backbones)
    return [k for k in space.searched if k != "unfreeze_depth" or depth_drawn]
