"""Search spaces at work: the built-in ones, a search's backbones, the define-by-run function TPE calls, the
starting configurations and the keys a search draws.

A space is a YAML file (format: docs/search.md; read by search.space_file into a search.space_format.Space): the
built-in spaces are the files in search/space_files/, read by the same loader as a user's ``--space-file``.
It runs as an Optuna define-by-run function (``trial`` -> constants) because the interesting spaces are
conditional: the unfreeze depth only means something for a pretrained backbone, and its range depends on how
many stages that backbone has. Ray's ``OptunaSearch`` calls the function once per trial; every
``trial.suggest_*`` becomes a config key, and the returned dict adds the constants.

The function is module-level and bound with ``functools.partial`` to the space's frozen parameters, so the
searcher pickles into the experiment checkpoint, which is what lets ``Tuner.restore`` bring TPE back exactly
where it was.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from datasets.errors import UserError
from search.space_file import load_space
from search.space_format import STAGES, Param, Space

DEFAULT_BASELINE = "baseline_bn"
SPACE_FILES = Path(__file__).resolve().parent / "space_files"  # package data (pyproject.toml)
# The built-in spaces (SPACE_FILES/<name>.yaml), in the order --list-spaces shows them.
SPACES: tuple[str, ...] = ("backbones", "baseline", "finetune", "probe", "demo", "smoke")

__all__ = ["Space", "SpaceOptions", "SPACES", "get_space", "list_spaces", "resolve_backbones", "define_by_run",
           "start_points", "drawn_keys", "pretrained_backbones_used"]


@dataclass(frozen=True)
class SpaceOptions:
    """What the CLI lets the user change about a space."""

    backbones: tuple[str, ...] | None = None  # --backbones a,b,c (None: the space's own choice)
    pretrained: bool = True  # --no-pretrained turns it off
    backbone: str | None = None  # --backbone (a space whose backbones come from_option: --backbone)
    max_epochs: int = 5
    seed: int = 0
    precision: str = "auto"  # --precision: every trial's config["precision"] (trainables.fastpath)


def _models():
    # Imported lazily: importing this module (search.run's CLI parser) should not pay for importing torch.
    from trainables import models

    return models


def baseline_backbones() -> list[str]:
    m = _models()
    return [n for n in m.MODELS if not m.is_pretrainable(n)]


def pretrainable_backbones() -> list[str]:
    m = _models()
    return [n for n in m.MODELS if m.is_pretrainable(n)]


@functools.lru_cache(maxsize=None)
def get_space(name: str) -> Space:
    """A built-in space, read from its file by the loader a --space-file goes through."""
    if name not in SPACES:
        raise UserError(f"unknown --space {name!r}; choose one of: {', '.join(SPACES)} (see --list-spaces), "
                        "or write your own: --space-file FILE.yaml")
    return load_space(SPACE_FILES / f"{name}.yaml", built_in=True)


def list_spaces() -> str:
    width = max(map(len, SPACES))
    return "\n".join(f"{s.name:<{width}}  {s.description}" for s in map(get_space, SPACES))


DEFAULT_PROBE = "mobilenet_v2"  # the backbone whose ImageNet weights install offline (make install)


def _is_hub_name(name: str) -> bool:
    from trainables.hub import is_hub_name

    return is_hub_name(name)


def _group(word: str) -> list[str]:
    return pretrainable_backbones() if word == "pretrainable" else baseline_backbones()


def _expand(names) -> list[str]:
    """Backbone names with the groups (pretrainable, from_scratch) replaced by their members, repeats dropped."""
    out = [m for n in names for m in (_group(n) if n in ("pretrainable", "from_scratch") else [n])]
    return list(dict.fromkeys(out))


def resolve_backbones(space: Space, opts: SpaceOptions) -> tuple[str, ...]:
    """The backbones a space will actually search, after --backbones / --backbone; checks every name
    (timm/<model> and hf-hub:<org>/<repo> names wherever the space allows any or pretrainable backbones)."""
    rule = space.backbones
    allowed = list(_models().MODELS) if rule.allowed == "any" else _group(rule.allowed) \
        if isinstance(rule.allowed, str) else list(rule.allowed)

    def check(names, option):
        for n in names:
            if rule.allowed in ("any", "pretrainable") and _is_hub_name(n):
                _models().get_backbone(n)  # an unknown timm model is one line now, not in a trial
                continue
            if n not in allowed:
                raise UserError(f"unknown backbone {n!r} in {option} for {space.option}; "
                                f"choose from: {', '.join(allowed)}")

    if space.pretrained == "always" and not opts.pretrained:
        raise UserError(f"{space.option} fine-tunes pretrained weights; drop --no-pretrained "
                        "(or use --space backbones --no-pretrained to train from scratch)")
    if rule.mode == "from_option":
        if not opts.backbone:
            raise UserError(f"{space.option} needs --backbone NAME; choose from: " + ", ".join(allowed))
        if opts.backbones:
            raise UserError(f"{space.option} fine-tunes the one --backbone; drop --backbones")
        check([opts.backbone], "--backbone")
        return (opts.backbone,)
    if opts.backbone:
        raise UserError(f"--backbone is for --space finetune (backbones: from_option: --backbone); with "
                        f"{space.option} use --backbones a,b,c")
    if rule.mode == "fixed":
        if opts.backbones:
            raise UserError(f"{space.option} always uses {rule.names[0]}; "
                            "use --space backbones --backbones ... instead")
        return rule.names
    if opts.backbones:
        check(opts.backbones, "--backbones")
        return tuple(dict.fromkeys(opts.backbones))  # keep order, drop repeats
    return tuple(_expand(rule.names))


def loads_weights(space: Space, opts: SpaceOptions) -> bool:
    """Whether this search's pretrainable backbones start from ImageNet weights."""
    return space.pretrained == "always" or (space.pretrained is True and opts.pretrained)


def pretrained_backbones_used(space: Space, backbones: tuple[str, ...], opts: SpaceOptions) -> list[str]:
    """Backbones whose ImageNet weights the search will load (for the pre-flight weights check)."""
    if not loads_weights(space, opts):
        return []
    pretrainable = set(pretrainable_backbones())
    return [b for b in backbones if b in pretrainable or _is_hub_name(b)]


def _backbone_matches(backbone: str, allowed: tuple, pretrained: bool) -> bool:
    if allowed[0] in ("pretrained", "from_scratch"):
        loads = pretrained and _models().is_pretrainable(backbone)
        return loads == (allowed[0] == "pretrained")
    return backbone in allowed


_ABSENT = object()


def condition_holds(param: Param, values: dict, backbone: str, pretrained: bool) -> bool:
    """Whether ``param`` is drawn, given the values drawn before it (a parameter not drawn fails a condition)."""
    for on, allowed in param.when:
        if on == "backbone":
            if not _backbone_matches(backbone, allowed, pretrained):
                return False
        elif not any(values.get(on, _ABSENT) == v for v in allowed):
            return False
    return True


def suggest(trial, param: Param, backbone: str):
    """One ``trial.suggest_*`` call; a STAGES bound is the backbone's number of stages (Optuna allows a dynamic
    range; with the multivariate, grouped TPE sampler it is modelled jointly with the backbone that made it)."""
    if param.distribution == "categorical":
        return trial.suggest_categorical(param.name, list(param.choices))
    high = _models().num_stages(backbone) if param.high == STAGES else param.high
    if param.distribution == "int":
        return trial.suggest_int(param.name, param.low, high, step=param.step or 1, log=param.log)
    return trial.suggest_float(param.name, param.low, high, step=param.step, log=param.distribution == "log_uniform")


def define_by_run(space: Space, backbones: tuple[str, ...], opts: SpaceOptions) -> Callable[[Any], dict]:
    """The Optuna define-by-run function for this search: the space plus the search-wide constants."""
    pretrained = loads_weights(space, opts)
    constants = {**space.constants, "epochs": opts.max_epochs, "seed": opts.seed, "precision": opts.precision}
    if not space.searches_backbone:
        constants["backbone"] = backbones[0]
    constants["pretrained"] = pretrained
    return functools.partial(draw, space.parameters, tuple(backbones) if space.searches_backbone else None,
                             pretrained, constants)


def draw(params: tuple, choose_from: tuple | None, pretrained: bool, constants: dict, trial) -> dict:
    """Draw one config (``choose_from``: the backbones to draw among, None when it is a constant); returns the
    constants, with each conditional parameter that was not drawn at its ``otherwise`` value."""
    values: dict = {}
    backbone = trial.suggest_categorical("backbone", list(choose_from)) if choose_from else constants["backbone"]
    out = dict(constants)
    for p in params:
        if p.when and not condition_holds(p, values, backbone, pretrained):
            out[p.name] = p.otherwise
            continue
        values[p.name] = suggest(trial, p, backbone)
    return out


def start_points(space: Space, backbones: tuple[str, ...], opts: SpaceOptions) -> list[dict]:
    """The space's starting configurations for this search, in the names its define-by-run function suggests:
    those of the search's backbones (a point without one starts on the first), a STAGES value the backbone's
    number of stages, and a conditional parameter only where its condition holds."""
    pretrained = loads_weights(space, opts)
    points = []
    for p in space.start:
        p = dict(p)
        backbone = p.get("backbone", backbones[0])
        if space.searches_backbone:
            if backbone not in backbones:
                continue
            p["backbone"] = backbone
        for param in space.parameters:
            if param.when and not condition_holds(param, p, backbone, pretrained):
                p.pop(param.name, None)
            elif p.get(param.name) == STAGES:
                p[param.name] = _models().num_stages(backbone)
        points.append(p)
    return points


def drawn_keys(space: Space, backbones: tuple[str, ...], opts: SpaceOptions) -> list[str]:
    """The keys this search draws (the rest of a config is constant), in drawing order: the space's parameters
    less those whose backbone condition no backbone of the search meets (the unfreeze depth from scratch, or
    without a pretrainable backbone), and those conditioned on a parameter that is never drawn."""
    pretrained = loads_weights(space, opts)
    keys = ["backbone"] if space.searches_backbone else []
    for p in space.parameters:
        on_backbone = [a for on, a in p.when if on == "backbone"]
        if all(any(_backbone_matches(b, a, pretrained) for b in backbones) for a in on_backbone) and \
                all(on == "backbone" or on in keys for on, _ in p.when):
            keys.append(p.name)
    return keys
