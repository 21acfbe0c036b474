"""What a search space is, as data: `Space`, its `Param`s and its `BackboneRule`, and the words of the file format.

search.space_file reads a YAML file into these; search.spaces runs them (draws a trial's config, resolves the
backbones and the starting configurations). Frozen dataclasses of plain values: a search's define-by-run function
holds them and pickles into Ray's experiment checkpoint, which is what lets --resume bring TPE back.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

DISTRIBUTIONS = {"log_uniform": ("low", "high"), "uniform": ("low", "high", "step"),
                 "int": ("low", "high", "step", "log"), "categorical": ("choices",)}
STAGES = "stages"  # a bound or start value: the backbone's number of stages (all of them train)
BACKBONE_GROUPS = ("pretrainable", "from_scratch")  # in backbones: choose/allowed
BACKBONE_CONDITIONS = ("pretrained", "from_scratch")  # when: {backbone: pretrained} = loads ImageNet weights here
# Config keys the search itself sets: where a file sets them instead of parameters/constants.
SET_BY_SEARCH = {"backbone": "the backbones: section", "pretrained": "the top-level pretrained: key",
                 "epochs": "scheduler: max_epochs (or --max-epochs)", "seed": "--seed", "precision": "--precision"}
TOP_KEYS = ("name", "description", "backbones", "pretrained", "cached_features", "scheduler", "parameters",
            "constants", "start")
SCHEDULER_DEFAULTS = {"num_samples": 16, "max_epochs": 5, "grace_period": 1, "reduction_factor": 2}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,59}$")


@dataclass(frozen=True)
class Param:
    """One drawn config key: ``distribution`` with its bounds or choices, drawn only ``when`` its conditions hold
    (``((key, allowed values), ...)``, key = "backbone" or an earlier categorical parameter), else ``otherwise``."""

    name: str
    distribution: str
    low: float | int | None = None
    high: float | int | str | None = None  # str: STAGES
    step: float | int | None = None
    log: bool = False
    choices: tuple = ()
    when: tuple = ()
    otherwise: Any = None

    def contains(self, value, stages: int | None = None) -> bool:
        """Whether ``value`` can be drawn (``stages``: the backbone's, for a STAGES bound; None = unknown yet)."""
        if self.distribution == "categorical":
            return any(value == c and type(value) is type(c) for c in self.choices)
        if value == STAGES:
            return self.high == STAGES
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (self.distribution == "int" and not float(value).is_integer()):
            return False
        high = (stages if stages is not None else math.inf) if self.high == STAGES else self.high
        return self.low <= value <= high


@dataclass(frozen=True)
class BackboneRule:
    """How a space gets its backbones: ``mode`` "choose" (drawn among ``names``, names and groups; --backbones
    replaces them), "fixed" (``names`` = the one backbone) or "from_option" (the one --backbone); ``allowed``:
    "any", a group, or names (what --backbones / --backbone may name)."""

    mode: str
    names: tuple = ()
    allowed: str | tuple = "any"


@dataclass(frozen=True)
class Space:
    name: str
    description: str
    backbones: BackboneRule
    pretrained: bool | str  # True: ImageNet weights unless --no-pretrained; False: from scratch; "always"
    parameters: tuple  # of Param, in the order they are drawn (after the backbone, when it is drawn)
    constants: dict
    num_samples: int = SCHEDULER_DEFAULTS["num_samples"]
    max_epochs: int = SCHEDULER_DEFAULTS["max_epochs"]
    grace_period: int = SCHEDULER_DEFAULTS["grace_period"]
    reduction_factor: float = SCHEDULER_DEFAULTS["reduction_factor"]
    # Known-good configurations evaluated first (Ray's points_to_evaluate); STAGES = every stage.
    start: tuple = ()
    # Trials train a head on the embedding cache (trainables.embeddings): the driver computes it before Ray starts.
    cached_features: bool = False
    source: str = ""  # the file read
    text: str = field(default="", repr=False)  # its text, stored with a search (search.settings)
    sha256: str = ""
    built_in: bool = False

    @property
    def searches_backbone(self) -> bool:
        return self.backbones.mode == "choose"

    @property
    def option(self) -> str:
        """How the user named this space, for messages."""
        return f"--space {self.name}" if self.built_in else f"--space-file {self.source}"
