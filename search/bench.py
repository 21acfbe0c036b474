"""`python -m search.bench`: search efficiency at an equal budget of trial-epochs, side by side in one run.

Strategies (same space, same trainable, same data, same budget of trained epochs):
- asha_tpe:       Optuna TPE + ASHA, ASHA-stopped trials told to TPE as PRUNED (what search.run uses)
- asha_tpe_stock: Optuna TPE + ASHA with Ray's stock OptunaSearch (stopped trials told as COMPLETE with
                  their low-rung AUC)
- random:         random search, every trial trained to max epochs (no early stopping)

A driver-side Stopper counts every reported epoch of every trial and ends the search when the budget is
spent, recording the best val_auc seen so far after each epoch: that curve is what gets printed.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from ray.tune import Stopper

from datasets.errors import run_cli

STRATEGIES = ("asha_tpe", "asha_tpe_stock", "random")


class EpochBudget(Stopper):
    """Tune Stopper: stop everything once `budget` trial-epochs were reported; keep best-so-far per epoch."""

    def __init__(self, budget: int):
        self.budget, self.used, self.best, self.curve = budget, 0, 0.0, []

    def __call__(self, trial_id, result):
        self.used += 1
        self.best = max(self.best, float(result.get("val_auc", 0.0)))
        self.curve.append((self.used, self.best))
        return False

    def stop_all(self):
        return self.used >= self.budget


def run_strategy(strategy: str, seed: int, args, cache_path: str, storage: str) -> list[tuple[int, float]]:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch
    import optuna

    from search.searcher import make_searcher
    from search.spaces import SpaceOptions, define_by_run, get_space, resolve_backbones
    from trainables.train import train_pcam

    space = get_space(args.space)
    opts = SpaceOptions(max_epochs=args.max_epochs, seed=0)  # same training seed for every config
    define = define_by_run(space, resolve_backbones(space, opts), opts)
    if args.max_train_samples:
        define = _with_constants(define, {"max_train_samples": args.max_train_samples})
    if strategy == "random":
        searcher = OptunaSearch(space=define, metric="val_auc", mode="max",
                                sampler=optuna.samplers.RandomSampler(seed=seed))
        scheduler, num_samples = FIFOScheduler(), -(-args.budget // args.max_epochs)
    else:
        searcher = make_searcher(define, seed=seed, num_samples=args.budget // args.grace_period,
                                 max_t=args.max_epochs, pruned_feedback=strategy == "asha_tpe")
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=args.max_epochs,
                                  grace_period=args.grace_period, reduction_factor=args.reduction_factor)
        num_samples = args.budget // args.grace_period  # more than the budget can ever start
    stopper = EpochBudget(args.budget)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(train_pcam, cache_path=cache_path), {"cpu": 1}),
        tune_config=tune.TuneConfig(metric="val_auc", mode="max", search_alg=searcher, scheduler=scheduler,
                                    num_samples=num_samples, max_concurrent_trials=args.max_concurrent),
        run_config=tune.RunConfig(name=f"{strategy}-{seed}", storage_path=storage, stop=stopper, verbose=0,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    tuner.fit()
    return stopper.curve


def _with_constants(define, constants):
    import functools

    return functools.partial(_define_plus, define, constants)


def _define_plus(define, constants, trial):
    return {**define(trial), **constants}


def best_at(curve: list[tuple[int, float]], budget: int) -> float:
    vals = [b for used, b in curve if used <= budget]
    return vals[-1] if vals else float("nan")


def get_args_parser():
    p = argparse.ArgumentParser(prog="python -m search.bench", description=__doc__.splitlines()[0])
    p.add_argument("--space", default="baseline")
    p.add_argument("--budget", type=int, default=16, help="trial-epochs per search (default 16)")
    p.add_argument("--max-epochs", type=int, default=4)
    p.add_argument("--grace-period", type=int, default=1)
    p.add_argument("--reduction-factor", type=float, default=2)
    p.add_argument("--max-train-samples", type=int, default=256, help="training patches per trial (speed)")
    p.add_argument("--seeds", type=int, default=1, help="repeat each strategy with this many searcher seeds")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--max-concurrent", type=int, default=os.cpu_count() or 2)
    p.add_argument("--data-dir", help="default: synthetic data of --synthetic-n patches")
    p.add_argument("--synthetic-n", type=int, default=600,
                   help="patches of the generated synthetic set when no --data-dir (default 600: CPU-sized)")
    p.add_argument("--cache-dir")
    return p


@run_cli
def main(argv=None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no per-search result boxes
    args = get_args_parser().parse_args(argv)
    import ray

    from datasets.cache import prepare_dataset

    data_dir = args.data_dir
    if data_dir is None:  # the embedded generator at a CPU-friendly size, generated once under the cache root
        from datasets.cache import default_cache_root
        from datasets.synthetic import ensure_synthetic

        root = Path(args.cache_dir) if args.cache_dir else default_cache_root()
        data_dir = ensure_synthetic(root / "synthetic", n=args.synthetic_n, seed=0)
    cache = prepare_dataset(data_dir, args.cache_dir, progress=True)
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    strategies = [s.strip() for s in args.strategies.split(",")]
    curves: dict[str, list] = {s: [] for s in strategies}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as storage:
        for seed in range(args.seeds):
            for s in strategies:
                t = time.perf_counter()
                curves[s].append(run_strategy(s, seed, args, str(cache.path), storage))
                print(f"{s:15s} seed {seed}: best val_auc {curves[s][-1][-1][1]:.4f} after "
                      f"{curves[s][-1][-1][0]} trial-epochs ({time.perf_counter() - t:.0f} s)", flush=True)
    ray.shutdown()
    marks = sorted({max(1, round(args.budget * f)) for f in (0.25, 0.5, 0.75, 1.0)})
    print(f"\nbest val_auc vs budget (trial-epochs), mean over {args.seeds} seed(s); space {args.space}, "
          f"max {args.max_epochs} epochs, <= {args.max_train_samples} train patches, data {data_dir}")
    print(f"{'strategy':15s}" + "".join(f"{m:>10d}" for m in marks))
    for s in strategies:
        means = [np.nanmean([best_at(c, m) for c in curves[s]]) for m in marks]
        print(f"{s:15s}" + "".join(f"{v:10.4f}" for v in means))
    print(f"(total {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
