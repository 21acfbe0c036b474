"""A search space as a YAML file, read into a `Space` (search.spaces runs it); the format is docs/search.md's.

The built-in spaces (search/space_files/<name>.yaml) and a user's ``--space-file`` go through this one loader, so
what ``--list-spaces`` shows is what a user can write. Every mistake is one UserError line naming the file, the key
and what is allowed, raised here, before Ray starts. The ``Space`` keeps the file's text and its sha256: a search
stores both (search.settings), so ``--resume`` and ``--warm-start`` use the space the search started with.
(Over 300 lines: one check per key of the format, each with the message that names what is allowed.)
"""
from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import yaml

from datasets.errors import UserError
from search.space_format import (BACKBONE_CONDITIONS, BACKBONE_GROUPS, DISTRIBUTIONS, NAME_RE, SCHEDULER_DEFAULTS,
                                 SET_BY_SEARCH, STAGES, TOP_KEYS, BackboneRule, Param, Space)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 1e-4 as a string; a space file means the number. Repeated keys are a mistake, not a merge."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
    r"|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def read_yaml(path: Path) -> tuple[dict, str]:
    """The file's mapping and text; a missing file or a YAML mistake is one line with the line number."""
    try:
        text = path.read_bytes().decode("utf-8")  # as it is on disk: its sha256 is the file's
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise UserError(f"space file {path}: no such file; give the path of a YAML space file "
                        "(docs/search.md, 'Your own space')") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"space file {path}: cannot be read ({e})") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise UserError(f"{where}: not valid YAML ({what}); see docs/search.md for the format") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a space file is a YAML mapping with the keys {', '.join(TOP_KEYS)}; this one "
                        + ("is empty" if data is None else f"holds a {type(data).__name__}"))
    return data, text


def load_space(path: str | Path, built_in: bool = False) -> Space:
    """Read and check a space file (every mistake: one UserError line before anything runs)."""
    data, text = read_yaml(Path(path))
    return _Checker(Path(path)).space(data, text, built_in)


def _words(values) -> str:
    return ", ".join(str(v) for v in values)


class _Checker:
    """Turns the parsed mapping into a Space; ``fail`` names the file and the key."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, problem: str):
        raise UserError(f"{self.path}: {key}: {problem}")

    def mapping(self, value, key: str, allowed=None) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(key, f"must be a mapping (key: value lines), not {type(value).__name__} {value!r}")
        for k in value:
            if allowed is not None and k not in allowed:
                self.fail(f"{key}.{k}" if key else str(k), f"unknown key; allowed: {_words(allowed)}")
        return value

    def number(self, value, key: str, integer: bool = False):
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok or not math.isfinite(value):
            self.fail(key, f"{value!r} is not {'a whole number' if integer else 'a number'}")
        return value

    def space(self, data: dict, text: str, built_in: bool) -> Space:
        self.mapping(data, "", TOP_KEYS)
        name = data.get("name", self.path.stem)
        if not isinstance(name, str) or not NAME_RE.match(name):
            self.fail("name", f"{name!r}: use letters, digits, '.', '_' or '-' (up to 60 characters)")
        description = data.get("description", "")
        if not isinstance(description, str):
            self.fail("description", "must be text")
        from trainables.config import DEFAULTS  # the trainable's config keys (imports torch: checked here only)

        self.config_keys = tuple(DEFAULTS)
        self.defaults = DEFAULTS
        backbones = self.backbone_rule(data.get("backbones"))
        pretrained = data.get("pretrained", True)
        if not (isinstance(pretrained, bool) or pretrained == "always"):
            self.fail("pretrained", f"{pretrained!r}; allowed: true (ImageNet weights unless --no-pretrained), "
                                    "false (from scratch), always (--no-pretrained refused)")
        sched = {**SCHEDULER_DEFAULTS, **self.mapping(data.get("scheduler"), "scheduler", SCHEDULER_DEFAULTS)}
        for k in ("num_samples", "max_epochs", "grace_period"):
            if self.number(sched[k], f"scheduler.{k}", integer=True) < 1:
                self.fail(f"scheduler.{k}", f"{sched[k]} must be 1 or more")
        if self.number(sched["reduction_factor"], "scheduler.reduction_factor") <= 1:
            self.fail("scheduler.reduction_factor", f"{sched['reduction_factor']} must be more than 1 (e.g. 2 or 3)")
        if sched["grace_period"] > sched["max_epochs"]:
            self.fail("scheduler.grace_period", f"{sched['grace_period']} is more than max_epochs "
                                                f"{sched['max_epochs']}")
        params = self.parameters(data.get("parameters"), backbones)
        constants = self.constants(data.get("constants"), params)
        cached = data.get("cached_features", False)
        if not isinstance(cached, bool):
            self.fail("cached_features", f"{cached!r}; allowed: true or false")
        if cached and constants.get("unfreeze_depth") != 0:
            self.fail("cached_features", "true trains a head on the frozen backbone's features: it needs "
                                         "constants: unfreeze_depth: 0")
        start = self.start(data.get("start"), params, backbones)
        return Space(name=name, description=" ".join(description.split()), backbones=backbones, pretrained=pretrained,
                     parameters=params, constants=constants, num_samples=sched["num_samples"],
                     max_epochs=sched["max_epochs"], grace_period=sched["grace_period"],
                     reduction_factor=sched["reduction_factor"], start=start, cached_features=cached,
                     source=str(self.path), text=text, sha256=hashlib.sha256(text.encode()).hexdigest(),
                     built_in=built_in)

    def backbone_names(self, values, key: str, groups=BACKBONE_GROUPS) -> tuple:
        values = [values] if isinstance(values, str) else values
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            self.fail(key, f"{values!r}: give a backbone name or a list of them")
        from trainables.backbones import MODELS
        from trainables.hub import is_hub_name

        for v in values:
            if v not in MODELS and v not in groups and not is_hub_name(v):
                self.fail(key, f"unknown backbone {v!r}; allowed: {_words([*MODELS, *groups])}, timm/<model>, "
                               "hf-hub:<org>/<repo>")
        return tuple(values)

    def backbone_rule(self, value) -> BackboneRule:
        modes = ("choose", "fixed", "from_option")
        if value is None:
            self.fail("backbones", "missing; give choose: [names], fixed: NAME or from_option: --backbone")
        value = self.mapping(value, "backbones", (*modes, "allowed"))
        given = [m for m in modes if m in value]
        if len(given) != 1:
            self.fail("backbones", f"give exactly one of {_words(modes)} (got {_words(given) or 'none'})")
        mode = given[0]
        allowed = value.get("allowed", "any")
        if allowed not in ("any", *BACKBONE_GROUPS):
            allowed = self.backbone_names(allowed, "backbones.allowed", groups=())
        if mode == "fixed":
            if "allowed" in value:
                self.fail("backbones.allowed", "a fixed backbone allows no other; drop allowed:")
            names = self.backbone_names(value["fixed"], "backbones.fixed", groups=())
            if len(names) != 1:
                self.fail("backbones.fixed", f"{list(names)}: one backbone (use choose: for several)")
            return BackboneRule("fixed", names)
        if mode == "from_option":
            if value["from_option"] != "--backbone":
                self.fail("backbones.from_option", f"{value['from_option']!r}; allowed: --backbone")
            return BackboneRule("from_option", (), allowed)
        names = self.backbone_names(value["choose"], "backbones.choose")
        if isinstance(allowed, tuple):
            outside = [n for n in names if n not in allowed]
            if outside:
                self.fail("backbones.choose", f"{outside[0]!r} is not in allowed: {_words(allowed)}")
        elif allowed != "any":
            from trainables.models import MODELS, is_pretrainable

            def group(n):  # a timm/... or hf-hub:... name has weights
                pretrainable = n not in MODELS or is_pretrainable(n)
                return n if n in BACKBONE_GROUPS else "pretrainable" if pretrainable else "from_scratch"

            wrong = [n for n in names if group(n) != allowed]
            if wrong:
                self.fail("backbones.choose", f"{wrong[0]!r} is outside allowed: {allowed}")
        return BackboneRule("choose", names, allowed)

    def config_key(self, name, key: str) -> None:
        if name in SET_BY_SEARCH:
            self.fail(key, f"{name!r} is set by the search: use {SET_BY_SEARCH[name]}")
        if name not in self.config_keys:
            self.fail(key, f"unknown config key {name!r}; the trainable's keys: "
                           f"{_words(k for k in self.config_keys if k not in SET_BY_SEARCH)}")

    def accepted(self, key: str, name: str, value) -> None:
        """The trainable's own check of one value (trainables.config.resolve_config), now rather than in a trial."""
        from trainables.config import resolve_config

        try:
            resolve_config({name: value})
        except (UserError, ValueError, TypeError) as e:
            self.fail(key, f"{value!r}: the trainable refuses it ({e})")

    def parameters(self, value, backbones: BackboneRule) -> tuple:
        params: list[Param] = []
        for name, spec in self.mapping(value, "parameters").items():
            key = f"parameters.{name}"
            self.config_key(name, key)
            spec = self.mapping(spec, key)
            dist = spec.get("distribution")
            if dist not in DISTRIBUTIONS:
                self.fail(f"{key}.distribution", f"unknown distribution {dist!r}; allowed: {_words(DISTRIBUTIONS)}")
            self.mapping(spec, key, ("distribution", *DISTRIBUTIONS[dist], "when", "otherwise"))
            when = self.condition(spec.get("when"), f"{key}.when", params, backbones)
            otherwise = spec.get("otherwise", self.defaults[name])
            if "otherwise" in spec and not when:
                self.fail(f"{key}.otherwise", "only with when: (the value when the condition does not hold)")
            if dist == "categorical":
                choices = spec.get("choices")
                if not isinstance(choices, list) or not choices:
                    self.fail(f"{key}.choices", f"{choices!r}: give a non-empty list, e.g. [32, 64, 128]")
                if any(isinstance(c, (list, dict)) for c in choices) or len({repr(c) for c in choices}) < len(choices):
                    self.fail(f"{key}.choices", f"{choices!r}: plain values (numbers, text, true/false, null), "
                                                "each once")
                for c in choices:
                    self.accepted(f"{key}.choices", name, c)
                params.append(Param(name, dist, choices=tuple(choices), when=when, otherwise=otherwise))
                continue
            params.append(self.range(name, key, dist, spec, when, otherwise))
            for bound in ("low", "high"):
                if params[-1].high != STAGES or bound == "low":
                    self.accepted(f"{key}.{bound}", name, getattr(params[-1], bound))
        return tuple(params)

    def range(self, name: str, key: str, dist: str, spec: dict, when: tuple, otherwise) -> Param:
        for bound in ("low", "high"):
            if bound not in spec:
                self.fail(f"{key}.{bound}", f"missing; a {dist} parameter needs low and high")
        integer = dist == "int"
        low = self.number(spec["low"], f"{key}.low", integer)
        high = spec["high"]
        if high == STAGES:
            if not integer:
                self.fail(f"{key}.high", f"{STAGES!r} (the backbone's number of stages) is for an int parameter")
        else:
            high = self.number(high, f"{key}.high", integer)
            if low > high:
                self.fail(key, f"low {low} is above high {high}; low <= high")
        log = dist == "log_uniform" or spec.get("log", False)
        if not isinstance(log, bool):
            self.fail(f"{key}.log", f"{log!r}; allowed: true or false")
        if log and low <= 0:
            self.fail(f"{key}.low", f"{low}: a log scale needs low > 0")
        step = spec.get("step")
        if step is not None:
            if self.number(step, f"{key}.step", integer) <= 0:
                self.fail(f"{key}.step", f"{step} must be more than zero")
            if log:
                self.fail(f"{key}.step", "a log scale takes no step (Optuna); drop one of them")
        if not integer:
            low, high = float(low), float(high)
        return Param(name, dist, low=low, high=high, step=step, log=bool(log and integer), when=when,
                     otherwise=otherwise)

    def condition(self, value, key: str, earlier: list, backbones: BackboneRule) -> tuple:
        if value is None:
            return ()
        conds = []
        by_name = {p.name: p for p in earlier}
        for on, allowed in self.mapping(value, key).items():
            values = allowed if isinstance(allowed, list) else [allowed]
            if on == "backbone":
                names = self.backbone_names(values, f"{key}.backbone", groups=BACKBONE_CONDITIONS)
                if any(n in BACKBONE_CONDITIONS for n in names) and len(names) > 1:
                    self.fail(f"{key}.backbone", f"{names}: either one of {_words(BACKBONE_CONDITIONS)} or names")
                conds.append(("backbone", names))
                continue
            if on not in by_name:
                self.fail(f"{key}.{on}", f"no parameter {on!r} is drawn before this one; a condition names backbone "
                                         f"or an earlier categorical parameter ({_words(by_name) or 'none here'})")
            parent = by_name[on]
            if parent.distribution != "categorical":
                self.fail(f"{key}.{on}", f"{on} is a {parent.distribution} parameter; a condition names a categorical "
                                         "one (or backbone)")
            bad = [v for v in values if not parent.contains(v)]
            if bad:
                self.fail(f"{key}.{on}", f"{bad[0]!r} is not one of {on}'s choices: {_words(parent.choices)}")
            conds.append((on, tuple(values)))
        return tuple(conds)

    def constants(self, value, params: tuple) -> dict:
        constants = self.mapping(value, "constants")
        drawn = {p.name for p in params}
        for name, v in constants.items():
            self.config_key(name, f"constants.{name}")
            if name in drawn:
                self.fail(f"constants.{name}", f"{name} is also a parameter; keep one of them")
            if isinstance(v, (list, dict)):
                self.fail(f"constants.{name}", f"{v!r}: a constant is one plain value")
            self.accepted(f"constants.{name}", name, v)
        return dict(constants)

    def start(self, value, params: tuple, backbones: BackboneRule) -> tuple:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.fail("start", f"must be a list of configurations (- key: value), not {type(value).__name__}")
        by_name = {p.name: p for p in params}
        keys = (["backbone"] if backbones.mode == "choose" else []) + list(by_name)
        points = []
        for i, point in enumerate(value):
            key = f"start[{i}]"
            point = self.mapping(point, key)
            for k, v in point.items():
                if k == "backbone" and backbones.mode == "choose":
                    self.backbone_names(v, f"{key}.backbone", groups=())
                elif k not in by_name:
                    self.fail(f"{key}.{k}", f"not a drawn parameter of this space; allowed: {_words(keys)}")
                elif not by_name[k].contains(v):
                    p = by_name[k]
                    what = f"one of {_words(p.choices)}" if p.distribution == "categorical" else \
                        f"{'a whole number ' if p.distribution == 'int' else ''}in [{p.low}, {p.high}]"
                    self.fail(f"{key}.{k}", f"{v!r} is outside the parameter's range; allowed: {what}")
            points.append(dict(point))
        return tuple(points)
