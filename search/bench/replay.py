"""Searches replayed against the recorded learning-curve table (search.bench.record): the discretised space, the
replay trainable, and the strategies, each built from the product's own searcher and scheduler classes.

- ``define_grid``: the recorded grid as an Optuna define-by-run space (categorical choices over the grid values;
  unfreeze depth only for the pretrained backbone, as in `search.spaces.define_backbones`).
- ``replay_results(record)``: the results a trial of that grid point reports, epoch by epoch, exactly as
  trainables.train.fit reports them (the recorded values; the objective by trainables.loop.best_of).
- ``replay_trainable``: a Ray Tune function trainable reporting them (a real Tuner replays the table with it).
- ``STRATEGIES``: name -> `Strategy`; ``build(strategy, ...)`` gives (searcher, scheduler) from
  search.searcher.make_searcher / make_sampler and search.tuner.make_scheduler, the functions search.run uses.

A partial table (the recording runs over several sessions) holds a balanced sample of the grid; a grid point not
recorded yet replays the nearest recorded point of its backbone (``Table.lookup``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from search.bench.record import KEYS, config_key, load_table

TRIAL_SEED = 0  # every replayed trial trains with seed 0, as search.run's trials all share --seed


class Table:
    """The recorded file, indexed by grid point."""

    AXES = ("lr", "weight_decay", "aug_strength", "batch_size", "unfreeze_depth")

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.data = load_table(Path(path))
        self.grid: dict = self.data["setup"]["grid"]
        self.max_epochs: int = int(self.data["setup"]["max_epochs"])
        self.records = {r["key"]: r for r in self.data["records"]}

    def lookup(self, config: dict, seed: int = TRIAL_SEED, nearest: bool = True) -> dict | None:
        """The record of ``config``'s grid point; in a partial table, a point not recorded yet gets the nearest
        recorded point of its backbone (grid steps, each axis scaled to 0..1): every strategy then searches the
        same piecewise-constant landscape. ``nearest=False``: None instead."""
        point = {k: config.get(k) for k in KEYS[:-1]} | {"seed": seed}
        found = self.records.get(config_key(point))
        if found is not None or not nearest:
            return found
        axes = self.grid[point["backbone"]]
        candidates = [r for r in self.records.values()
                      if r["config"]["seed"] == seed and r["config"]["backbone"] == point["backbone"]]

        def distance(r):
            return sum(abs(axes[k].index(r["config"][k]) - axes[k].index(point[k])) / max(1, len(axes[k]) - 1)
                       for k in self.AXES)
        return min(candidates, key=lambda r: (distance(r), r["key"])) if candidates else None

    def points(self, seed: int = TRIAL_SEED) -> list[dict]:
        return [r for r in self.records.values() if r["config"]["seed"] == seed]


def define_grid(grid: dict, trial) -> dict:
    """The recorded grid as a define-by-run space (module level, so the searcher pickles)."""
    backbone = trial.suggest_categorical("backbone", list(grid))
    axes = grid[backbone]
    cfg = {"backbone": backbone, "seed": TRIAL_SEED}
    for k in ("lr", "weight_decay", "aug_strength", "batch_size"):
        cfg[k] = trial.suggest_categorical(k, axes[k])
    depths = axes["unfreeze_depth"]
    cfg["unfreeze_depth"] = trial.suggest_categorical("unfreeze_depth", depths) if depths != [None] else None
    return cfg


def snap(point: dict, grid: dict) -> dict | None:
    """A space's starting point moved to the nearest grid values (log scale for lr and weight decay); None when
    its backbone is not in the grid."""
    axes = grid.get(point.get("backbone"))
    if axes is None:
        return None
    out = {"backbone": point["backbone"]}
    for k in ("lr", "weight_decay", "aug_strength", "batch_size", "unfreeze_depth"):
        values, v = axes[k], point.get(k)
        if values == [None]:
            continue
        if v is None:  # None = all stages
            v = max(values)
        scale = math.log if k in ("lr", "weight_decay") else float
        out[k] = min(values, key=lambda g: abs(scale(g) - scale(v)))
    return out


OBJECTIVES = {  # part 2: what a trial reports as its objective (best_val_auc) and which epoch's model it keeps
    "best": "best val AUC so far, its epoch's model (search.run's objective)",
    "last2": "mean val AUC of the last two epochs, the last epoch's model (smoothed against noise)",
    "shift": "best val AUC under the stain shift so far, its epoch's model (validating under shift)",
}


def replay_results(record: dict, max_epochs: int | None = None, objective: str = "best") -> list[dict]:
    """What trainables.train.fit reports for this grid point, epoch by epoch (recorded values, unchanged); the
    objective by trainables.loop.best_of, or one of the other OBJECTIVES."""
    from trainables.loop import best_of

    history, out = [], []
    for e in record["epochs"][:max_epochs]:
        m = {"epoch": e["epoch"], "val_auc": e["val_auc"] if e["status"] != "diverged" else 0.5,
             "val_loss": e["val_loss"], "train_loss": e["train_loss"], "epoch_seconds": e["seconds"],
             "trial_status": e["status"], "heldout_auc": e.get("heldout_auc"), "shifted_auc": e.get("shifted_auc"),
             "val_shifted_auc": e.get("val_shifted_auc")}
        if max_epochs is not None and e["epoch"] == max_epochs and m["trial_status"] == "running":
            m["trial_status"] = "completed"  # a shorter horizon than recorded ends here
        scored = {"best": m, "shift": {**m, "val_auc": m["val_shifted_auc"]}, "last2": m}[objective]
        history.append(scored)
        best, at = best_of(history)
        if objective == "last2" and m["trial_status"] != "diverged":
            healthy = [h["val_auc"] for h in history if h["trial_status"] != "diverged"]
            best, at = sum(healthy[-2:]) / len(healthy[-2:]), m["epoch"]
        m["best_val_auc"], m["best_epoch"] = (0.5 if best != best else best), at
        out.append(m)
    return out


def replay_trainable(config: dict, table_path: str, max_epochs: int | None = None) -> None:
    """Ray Tune function trainable: reports the recorded curve of ``config``'s grid point (Table.lookup)."""
    from ray import tune

    record = Table(table_path).lookup(config)
    if record is None:
        return
    for m in replay_results(record, max_epochs):
        tune.report(m)


@dataclass(frozen=True)
class Strategy:
    """How one search is run: sampler, its feedback, early stopping, starting points."""

    sampler: str = "tpe"  # tpe | random | gp
    feedback: bool = True  # our outcome feedback (FeedbackOptunaSearch); False = Ray's stock OptunaSearch
    asha: bool = True
    grace_period: int | None = None  # None: the space's
    reduction_factor: float | None = None
    brackets: int = 1
    start: bool = True  # the space's starting configurations first (points_to_evaluate)
    n_startup: int | None = None  # None: search.searcher.startup_trials
    multivariate: bool = True
    constant_liar: bool = True


STRATEGIES: dict[str, Strategy] = {
    "random": Strategy(sampler="random", feedback=False, asha=False, start=False),
    "random_asha": Strategy(sampler="random", feedback=False, start=False),
    "tpe_asha_stock": Strategy(feedback=False, start=False),
    "defaults": Strategy(),  # search.run's defaults
    "defaults_no_start": Strategy(start=False),
}
CANDIDATES: dict[str, Strategy] = {  # part 2: sampler and ASHA settings, each without starting points
    "startup_2": Strategy(start=False, n_startup=2), "startup_10": Strategy(start=False, n_startup=10),
    "independent": Strategy(start=False, multivariate=False), "no_liar": Strategy(start=False, constant_liar=False),
    "grace_1": Strategy(start=False, grace_period=1), "grace_2": Strategy(start=False, grace_period=2),
    "rf_2": Strategy(start=False, reduction_factor=2), "rf_3": Strategy(start=False, reduction_factor=3),
    "grace_1_rf_2": Strategy(start=False, grace_period=1, reduction_factor=2),
    "brackets_2": Strategy(start=False, brackets=2),
}


# Optuna's GP sampler: a candidate too, named on its own (about 100 s per replayed search on this CPU, not 0.3 s)
SLOW_CANDIDATES: dict[str, Strategy] = {"gp": Strategy(sampler="gp", start=False)}


def build(strategy: Strategy, seed: int, table: Table, space, num_samples: int, max_epochs: int):
    """(searcher, scheduler) of ``strategy`` over the table's grid: the product's make_searcher / make_sampler /
    make_scheduler, as search.tuner.build_tuner calls them."""
    import functools

    import optuna
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from search import searcher
    from search.outcome import MODE, OBJECTIVE
    from search.tuner import make_scheduler

    define = functools.partial(define_grid, table.grid)
    from search.spaces import SpaceOptions, start_points

    points = start_points(space, tuple(table.grid), SpaceOptions()) if strategy.start else []
    start = [p for p in (snap(p, table.grid) for p in points) if p] or None
    if strategy.sampler == "random":
        alg = OptunaSearch(space=define, metric=OBJECTIVE, mode=MODE, points_to_evaluate=start,
                           sampler=optuna.samplers.RandomSampler(seed=seed))
    else:
        sampler = searcher.make_sampler(seed, num_samples, n_startup=strategy.n_startup,
                                        multivariate=strategy.multivariate, constant_liar=strategy.constant_liar,
                                        kind=strategy.sampler)
        alg = searcher.make_searcher(define, seed=seed, num_samples=num_samples, max_t=max_epochs,
                                     feedback=strategy.feedback, sampler=sampler, points_to_evaluate=start,
                                     n_startup=strategy.n_startup)
    if not strategy.asha:
        return alg, FIFOScheduler()
    return alg, make_scheduler(max_epochs, strategy.grace_period or space.grace_period,
                               strategy.reduction_factor or space.reduction_factor, brackets=strategy.brackets)


def strategy_named(name: str) -> Strategy:
    from datasets.errors import UserError

    known = {**STRATEGIES, **CANDIDATES, **SLOW_CANDIDATES}
    if name in known:
        return known[name]
    raise UserError(f"--strategies: unknown strategy {name!r}; choose from {', '.join(known)}")

