"""`python -m search.bench` (real trials): does the search pay? Held-out AUC of what each strategy would pick, vs budget.

"Best val AUC seen so far" rewards a strategy for drawing many noisy validation scores. This bench measures what
a user gets instead: a held-out set is carved once from the labelled patches (stratified, by slide when slides
are known, fixed seed) and never seen by any strategy. Every trial trains and validates on the rest, keeping a
checkpoint of each new best epoch. After every trial-epoch spent, the incumbent is the trial the strategy would
pick by its own objective (best val AUC, at its best epoch); once the search is over, the driver scores each
checkpoint that was ever an incumbent on the held-out set, and the curve records the held-out AUC of the
incumbent at every budget point.

Strategies (same space, data, trial seed, budget of trial-epochs, concurrency):
- random:          random configs, every trial trained to max epochs (no early stopping)
- random_asha:     random configs, ASHA early stopping
- tpe_asha_stock:  Optuna TPE + ASHA, Ray's stock OptunaSearch feedback
- tpe_asha:        Optuna TPE + ASHA, our outcome feedback (search.searcher; what search.run uses)

Recorded learning curves instead of real trials (many seeds in minutes): ``python -m search.bench record`` builds
the table (search.bench.record), ``python -m search.bench --recorded FILE`` replays searches on it
(search.bench.recorded).

Default: the real sample (../shared/pcam_sample beside the repo) when present, else the embedded synthetic data;
5 searcher seeds; a table (mean +- sd over seeds) and a PNG of held-out AUC vs budget.

Why one module of ~300 lines: a measurement, not a product phase; its strategies, held-out scoring and curves
must be read together to judge what it measures.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from ray.tune import Stopper

from datasets.errors import run_cli
from search.report import write_json

STRATEGIES = ("random", "random_asha", "tpe_asha_stock", "tpe_asha")
REAL_SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "pcam_sample"


class Recorder(Stopper):
    """Driver-side: sees every result in the order Tune processes them (one result = one trial-epoch spent),
    keeps each trial's objective and best epoch, records the incumbent after each, and stops at the budget."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self.trials: dict[str, tuple[float, int]] = {}  # trial_id -> (best_val_auc, best_epoch)
        self.curve: list[tuple[int, float, tuple[str, int]]] = []  # (trial-epochs, incumbent objective, its ckpt)

    def __call__(self, trial_id, result):
        if "best_val_auc" not in result or self.used >= self.budget:
            return False
        self.used += 1
        if result.get("trial_status") == "diverged":  # FAIL: never the incumbent (as in search.run)
            self.trials.pop(trial_id, None)
        else:
            self.trials[trial_id] = (float(result["best_val_auc"]), int(result["best_epoch"]))
        if self.trials:
            tid, (val, epoch) = max(self.trials.items(), key=lambda kv: kv[1][0])
            self.curve.append((self.used, val, (tid, epoch)))
        return False

    def stop_all(self):
        return self.used >= self.budget


def bench_trainable(config: dict, cache_path: str, pool_idx: np.ndarray, models_dir: str):
    """train_pcam's training (trainables.train.fit) on the pool rows only; the model of each new best epoch is
    written to ``models_dir/<trial>-<epoch>.pt`` (one machine: a plain folder, read back by the driver)."""
    import torch
    from ray import tune

    from datasets.cache import open_cache
    from datasets.splits import split_off
    from trainables.train import fit, resolve_config, trial_cpus

    torch.set_num_threads(trial_cpus())
    cfg = resolve_config(config)
    cache = open_cache(cache_path)
    labels, frac, seed = cache.labels[pool_idx], float(cfg["val_fraction"]), int(cfg["seed"])
    tr, va = split_off(labels, None if cache.groups is None else cache.groups[pool_idx], frac, seed)

    trial_id = tune.get_context().get_trial_id()

    def on_epoch(metrics, state, preds):
        if state is not None and metrics.get("best_epoch") == metrics["epoch"]:
            torch.save({"model": state["model"], "config": state["config"]},
                       Path(models_dir) / f"{trial_id}-{metrics['epoch']}.pt")
        tune.report(metrics)

    fit(cfg, cache, pool_idx[tr], pool_idx[va], on_epoch=on_epoch)


def score_incumbents(models_dir: Path, curve, cache, holdout_idx) -> list[tuple[int, float, float]]:
    """(trial-epochs, incumbent objective, held-out AUC of its model) for every point of the curve."""
    import torch
    from sklearn.metrics import roc_auc_score

    from trainables.models import build_model
    from trainables.train import predict_proba

    held_x, held_y = cache.images[holdout_idx], cache.labels[holdout_idx]
    scores: dict[tuple[str, int], float] = {}
    for key in dict.fromkeys(k for _, _, k in curve):
        state = torch.load(models_dir / f"{key[0]}-{key[1]}.pt", map_location="cpu", weights_only=True)
        cfg = state["config"]
        model = build_model(cfg["backbone"], False, cfg["unfreeze_depth"], cfg["dropout"])
        model.load_state_dict(state["model"])
        scores[key] = float(roc_auc_score(held_y, predict_proba(model, held_x, cfg, tta=False)))
    return [(used, val, scores[key]) for used, val, key in curve]


def make_strategy(strategy: str, seed: int, define, args):
    import optuna
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from ray.tune.search.optuna import OptunaSearch

    from search.outcome import OBJECTIVE
    from search.searcher import make_searcher

    asha = ASHAScheduler(time_attr="training_iteration", max_t=args.max_epochs, grace_period=args.grace_period,
                         reduction_factor=args.reduction_factor)
    n = args.budget // args.grace_period  # more trials than the budget can ever start
    if strategy.startswith("random"):
        alg = OptunaSearch(space=define, metric=OBJECTIVE, mode="max",
                           sampler=optuna.samplers.RandomSampler(seed=seed))
        return alg, (asha if strategy == "random_asha" else FIFOScheduler()), \
            (n if strategy == "random_asha" else -(-args.budget // args.max_epochs))
    alg = make_searcher(define, seed=seed, num_samples=n, max_t=args.max_epochs, feedback=strategy == "tpe_asha")
    return alg, asha, n


def run_strategy(strategy: str, seed: int, args, storage: str, cache, pool_idx, holdout_idx
                 ) -> list[tuple[int, float, float]]:
    from ray import tune

    from search.searcher import SchedulerStopMarker
    from search.spaces import SpaceOptions, define_by_run, get_space, resolve_backbones

    space = get_space(args.space)
    opts = SpaceOptions(max_epochs=args.max_epochs, seed=0)  # same training seed for every config
    define = define_by_run(space, resolve_backbones(space, opts), opts)
    define = functools.partial(_define_plus, define, {"max_train_samples": args.max_train_samples,
                                                      "batch_size": args.batch_size, "val_fraction": args.val_fraction})
    alg, scheduler, num_samples = make_strategy(strategy, seed, define, args)
    recorder = Recorder(args.budget)
    models_dir = Path(storage) / f"models-{strategy}-{seed}"
    models_dir.mkdir()
    trainable = tune.with_resources(tune.with_parameters(
        bench_trainable, cache_path=str(cache.path), pool_idx=pool_idx, models_dir=str(models_dir)), {"cpu": 1})
    tuner = tune.Tuner(
        trainable,
        # reuse_actors: a new trial reuses a finished one's worker (no new process, no torch import).
        tune_config=tune.TuneConfig(metric="best_val_auc", mode="max", search_alg=alg, scheduler=scheduler,
                                    num_samples=num_samples, max_concurrent_trials=args.max_concurrent,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name=f"{strategy}-{seed}", storage_path=storage, stop=recorder, verbose=0,
                                  callbacks=[SchedulerStopMarker(args.max_epochs)],
                                  failure_config=tune.FailureConfig(max_failures=0)))
    tuner.fit()
    return score_incumbents(models_dir, recorder.curve, cache, holdout_idx)


def _define_plus(define, constants, trial):
    return {**define(trial), **{k: v for k, v in constants.items() if v is not None}}


def at_budget(curve: list[tuple[int, float, float]], budget: int) -> float:
    """Held-out AUC of the incumbent once ``budget`` trial-epochs were spent (nan before the first result)."""
    vals = [held for used, _, held in curve if used <= budget]
    return vals[-1] if vals else float("nan")


def budget_to_reach(curve, target: float, budget: int) -> int | None:
    """First budget point at which the incumbent's held-out AUC is >= target."""
    return next((used for used, _, held in curve if used <= budget and held >= target), None)


def summarize(curves: dict[str, list], marks: list[int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for s, cs in curves.items():
        vals = np.array([[at_budget(c, m) for m in marks] for c in cs])
        out[s] = (np.nanmean(vals, axis=0), np.nanstd(vals, axis=0, ddof=1) if len(cs) > 1 else np.zeros(len(marks)))
    return out


def plot(curves: dict[str, list], budget: int, out: Path, title: str) -> Path:
    from search.report import _pyplot

    plt = _pyplot()
    xs = list(range(1, budget + 1))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s, (mean, sd) in summarize(curves, xs).items():
        ax.plot(xs, mean, label=s, lw=2 if s == "tpe_asha" else 1.2)
        ax.fill_between(xs, mean - sd, mean + sd, alpha=0.15)
    ax.set(xlabel="budget spent (trial-epochs)", ylabel="held-out AUC of the incumbent", title=title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def get_args_parser():
    p = argparse.ArgumentParser(prog="python -m search.bench", description=__doc__.splitlines()[0])
    p.add_argument("--space", default="baseline")
    p.add_argument("--budget", type=int, default=24, help="trial-epochs per search (default 24)")
    p.add_argument("--max-epochs", type=int, default=4)
    p.add_argument("--grace-period", type=int, default=1)
    p.add_argument("--reduction-factor", type=float, default=2)
    p.add_argument("--max-train-samples", type=int, default=192, help="training patches per trial (speed)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation share of the strategies' patches")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--holdout", type=float, default=0.25, help="fraction of labelled patches held out (default 0.25)")
    p.add_argument("--seeds", type=int, default=5, help="searcher seeds per strategy (default 5)")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--data-dir", help=f"default: {REAL_SAMPLE} if present, else synthetic data")
    p.add_argument("--synthetic", action="store_true", help="the embedded synthetic data even if the real sample is there")
    p.add_argument("--synthetic-n", type=int, default=1600, help="patches of the synthetic set when no real data")
    p.add_argument("--cache-dir")
    p.add_argument("--out", default="results/search_bench.png", help="PNG of held-out AUC vs budget; the curves "
                   "go to the same name .json after every search, and a rerun with the same settings continues")
    return p


def load_data(args):
    from datasets.cache import prepare_dataset
    from datasets.defaults import default_cache_root
    from datasets.synthetic import ensure_synthetic

    data_dir = args.data_dir or (str(REAL_SAMPLE) if (REAL_SAMPLE / "train_labels.csv").is_file()
                                 and not args.synthetic else None)
    if data_dir is None:  # the embedded generator, generated once under the cache root
        root = Path(args.cache_dir) if args.cache_dir else default_cache_root()
        data_dir = ensure_synthetic(root / "synthetic", n=args.synthetic_n, seed=0)
    return prepare_dataset(data_dir, args.cache_dir, progress=True), data_dir


def carve_holdout(cache, fraction: float, seed: int = 12345) -> tuple[np.ndarray, np.ndarray]:
    """(held-out rows, pool rows) of the labelled train split: search.run's holdout rule (datasets.splits)."""
    from datasets.splits import holdout_split

    held = holdout_split(cache, fraction, seed)
    return held, np.setdiff1d(cache.indices("train"), held)


@run_cli
def main(argv=None) -> int:
    """The real-trial bench (`python -m search.bench` without `record` / `--recorded`: search.bench.cli)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no per-search result boxes
    args = get_args_parser().parse_args(argv)
    import ray

    cache, data_dir = load_data(args)
    holdout, pool = carve_holdout(cache, args.holdout)
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    strategies = [s.strip() for s in args.strategies.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    saved = out.with_suffix(".json")
    settings = {k: v for k, v in vars(args).items() if k not in ("seeds", "strategies", "out")}
    settings["data_dir"] = str(data_dir)
    done = json.loads(saved.read_text()) if saved.is_file() else {}
    if done.get("settings") != settings:  # other settings: start afresh
        done = {"settings": settings, "curves": {}}
    curves: dict[str, list] = {s: [] for s in strategies}
    t0 = time.perf_counter()
    print(f"data {data_dir}: {len(pool)} patches for the strategies (<= {args.max_train_samples} trained per trial), "
          f"{len(holdout)} held out; space {args.space}, budget {args.budget} trial-epochs, max {args.max_epochs} "
          f"epochs, {args.max_concurrent} trials at once, {args.seeds} seeds", flush=True)
    with tempfile.TemporaryDirectory() as storage:
        for seed in range(args.seeds):
            for s in strategies:
                t = time.perf_counter()
                key = f"{s}/{seed}"
                if key not in done["curves"]:  # a long bench survives an interruption: finished searches are kept
                    done["curves"][key] = run_strategy(s, seed, args, storage, cache, pool, holdout)
                    write_json(saved, done)
                curves[s].append([tuple(p) for p in done["curves"][key]])
                c = curves[s][-1]
                print(f"{s:15s} seed {seed}: incumbent val {c[-1][1]:.4f}, held-out {c[-1][2]:.4f} after "
                      f"{c[-1][0]} trial-epochs ({time.perf_counter() - t:.0f} s)", flush=True)
    ray.shutdown()
    marks = sorted({max(1, round(args.budget * f)) for f in (1 / 6, 1 / 3, 0.5, 2 / 3, 1.0)})
    stats = summarize(curves, marks)
    print(f"\nheld-out AUC of the incumbent vs budget (trial-epochs): mean +- sd over {args.seeds} seeds")
    print(f"{'strategy':15s}" + "".join(f"{m:>15d}" for m in marks))
    for s in strategies:
        mean, sd = stats[s]
        print(f"{s:15s}" + "".join(f"{m:>8.4f} +-{d:.3f}" for m, d in zip(mean, sd)))
    if "random" in curves and "tpe_asha" in curves:
        target = stats["random"][0][-1]
        reach = [budget_to_reach(c, target, args.budget) for c in curves["tpe_asha"]]
        got = [r for r in reach if r is not None]
        print(f"\ntpe_asha reached random search's final mean held-out AUC ({target:.4f}) in {len(got)}/{len(reach)} "
              f"seeds; budget needed: {sorted(got)} of {args.budget} (target: <= {args.budget / 3:.0f})")
    plot(curves, args.budget, out, f"{args.space} space, {Path(str(data_dir)).name}, {args.seeds} seeds")
    print(f"wrote {out}  (total {time.perf_counter() - t0:.0f} s)")
    return 0

