"""`python -m search.bench --recorded FILE --seeds 50`: does the search pay, on recorded PCam learning curves?

Each strategy searches the recorded grid (search.bench.replay) with the product's own searcher, scheduler and
outcome code, in search.bench.sim's event-driven replay of asynchronous trials (``--concurrency`` at once, each
epoch taking its recorded seconds). After every trial-epoch the incumbent is the trial the strategy would pick by
its own objective; its held-out AUC (patches no trial trained or validated on), at its best epoch, is the curve.
Printed: mean held-out AUC of the incumbent with its 95 % interval over seeds, against the budget in trial-epochs
and in recorded seconds of search time; a PNG of both; the target check (the defaults reach random search's final
mean within a third of its budget, and are never below random + ASHA).
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

from datasets.files import write_atomically
from search.bench.replay import CANDIDATES, OBJECTIVES, STRATEGIES, Table, build, strategy_named
from search.bench.sim import at_budget, mean_ci, simulate

MAIN = ("random", "random_asha", "tpe_asha_stock", "defaults", "defaults_no_start")
FRACTIONS = (1 / 6, 1 / 3, 1 / 2, 2 / 3, 1.0)


def get_args_parser():
    p = argparse.ArgumentParser(prog="python -m search.bench --recorded FILE", description=__doc__.splitlines()[0])
    p.add_argument("--recorded", required=True, help="the table of search.bench record")
    p.add_argument("--seeds", type=int, default=50)
    p.add_argument("--strategies", default=",".join(MAIN),
                   help=f"comma-separated, from {', '.join([*STRATEGIES, *CANDIDATES])}, gp; 'candidates' adds "
                   "part 2's (all but gp)")
    p.add_argument("--objective", default="best", choices=list(OBJECTIVES))
    p.add_argument("--budget-trials", type=float, default=24,
                   help="the budget as full trials: trial-epochs = this x max epochs (default 24, the space's)")
    p.add_argument("--concurrency", type=int, default=2, help="trials at once (default 2, this 2-core machine)")
    p.add_argument("--space", default="backbones", help="whose ASHA settings and starting points (default backbones)")
    p.add_argument("--out", default="results/search_bench_recorded.png")
    return p


def run_all(args, table: Table, names: list[str]) -> tuple[dict, int, float]:
    from search.spaces import get_space

    space = get_space(args.space)
    max_epochs = table.max_epochs
    budget_epochs = int(round(args.budget_trials * max_epochs))
    full = [sum(e["seconds"] for e in r["epochs"]) for r in table.points()]
    budget_seconds = float(args.budget_trials * np.mean(full) / args.concurrency)  # random search's full trials
    curves: dict[str, list] = {n: [] for n in names}
    for name in names:
        t = time.perf_counter()
        for seed in range(args.seeds):
            alg, sched = build(strategy_named(name), seed, table, space, int(args.budget_trials), max_epochs)
            np.random.seed(seed)  # ASHA draws its bracket from numpy's global generator
            res = simulate(alg, sched, table, max_epochs=max_epochs, concurrency=args.concurrency,
                           stop_epochs=budget_epochs, stop_seconds=budget_seconds, objective=args.objective)
            curves[name].append(res.curve)
        print(f"{name:18s} {args.seeds} searches in {time.perf_counter() - t:.0f} s", flush=True)
    return curves, budget_epochs, budget_seconds


def table_at(curves: dict, marks: list[float], axis: str, field: str = "heldout") -> dict[str, list]:
    return {n: [mean_ci([getattr(at_budget(c, m, axis), field, float("nan")) if at_budget(c, m, axis) else
                         float("nan") for c in cs]) for m in marks] for n, cs in curves.items()}


def print_table(stats: dict, marks: list[float], unit: str) -> None:
    print(f"{'strategy':18s}" + "".join(f"{m:>16.0f}" for m in marks) + f"   ({unit})")
    for n, row in stats.items():
        print(f"{n:18s}" + "".join(f"{m:>9.4f} +-{h:.3f}" for m, h in row))


def target_check(curves: dict, marks: list[float], axis: str, budget: float) -> list[str]:
    """The issue's targets, measured: defaults reach random's final mean within a third of the budget; and are
    never below random + ASHA at any budget point (means compared)."""
    lines = []
    if "random" not in curves:
        return lines
    target = mean_ci([at_budget(c, budget, axis).heldout for c in curves["random"]])[0]
    for n in [n for n in curves if n.startswith("defaults")]:
        grid = np.linspace(budget / 24, budget, 24)
        means = [mean_ci([at_budget(c, b, axis).heldout if at_budget(c, b, axis) else float("nan")
                          for c in curves[n]])[0] for b in grid]
        reach = next((b for b, m in zip(grid, means) if m >= target), None)
        line = (f"{n}: reaches random's final mean held-out AUC {target:.4f} at "
                + (f"{reach:.0f} of {budget:.0f} {axis} ({reach / budget:.0%}; target <= 33%)" if reach
                   else "no budget point"))
        if "random_asha" in curves:
            ra = [mean_ci([at_budget(c, b, axis).heldout if at_budget(c, b, axis) else float("nan")
                           for c in curves["random_asha"]])[0] for b in grid]
            worse = [f"{b:.0f}" for b, m, r in zip(grid, means, ra) if m < r]
            line += "; below random_asha at " + (f"{len(worse)}/24 points ({', '.join(worse[:6])}...)" if worse
                                                 else "no point")
        lines.append(line)
    return lines


def plot(curves: dict, budgets: dict, out: Path, title: str) -> Path:
    from search.report import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (axis, budget) in zip(axes, budgets.items()):
        xs = np.linspace(budget / 60, budget, 60)
        for n, cs in curves.items():
            stats = [mean_ci([at_budget(c, x, axis).heldout if at_budget(c, x, axis) else float("nan") for c in cs])
                     for x in xs]
            m, h = np.array([s[0] for s in stats]), np.array([s[1] for s in stats])
            ax.plot(xs, m, label=n, lw=2 if n.startswith("defaults") else 1.2)
            ax.fill_between(xs, m - h, m + h, alpha=0.15)
        ax.set(xlabel="budget: trial-epochs" if axis == "epochs" else "budget: recorded seconds of search time",
               ylabel="held-out AUC of the incumbent (95 % CI)")
    axes[0].legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def seed_noise(table: Table) -> str | None:
    """How far two training seeds of one config land apart (last epoch), over the table's seed twins."""
    pairs = [(r, table.lookup(r["config"], seed=0, nearest=False)) for r in table.records.values()
             if r["config"]["seed"] == 1]
    diffs = {k: [abs(a["epochs"][-1].get(k) - b["epochs"][-1].get(k)) for a, b in pairs
                 if b and a["epochs"][-1].get(k) is not None and b["epochs"][-1].get(k) is not None]
             for k in ("val_auc", "heldout_auc")}
    if not diffs["val_auc"]:
        return None
    return (f"seed noise over {len(diffs['val_auc'])} seed twins (last epoch, |seed 0 - seed 1|): val AUC mean "
            f"{np.mean(diffs['val_auc']):.4f} (max {max(diffs['val_auc']):.4f}), held-out AUC mean "
            f"{np.mean(diffs['heldout_auc']):.4f} (max {max(diffs['heldout_auc']):.4f})")


def main(argv: list[str]) -> int:
    from datasets.errors import UserError

    args = get_args_parser().parse_args(argv)
    # Ray's stock OptunaSearch reports the duplicate of a trial's last result again (as in a real Tuner)
    warnings.filterwarnings("ignore", message="The reported value is ignored")
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.seeds < 2:
        raise UserError("--seeds must be at least 2 (a 95 % interval needs two)")
    table = Table(args.recorded)
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    names = [x for n in names for x in (CANDIDATES if n == "candidates" else [n])]
    for n in names:
        strategy_named(n)
    n_points = len(table.points())
    grid_size = sum(int(np.prod([len(v) for v in axes.values()])) for axes in table.grid.values())
    print(f"recorded table {args.recorded}: {n_points}/{grid_size} grid points, {len(table.records)} records, "
          f"{table.max_epochs} epochs; objective {args.objective}; {args.seeds} seeds; {args.concurrency} trials at once",
          flush=True)
    if n_points < grid_size:
        print(f"partial table: the {grid_size - n_points} grid points not recorded yet replay the nearest recorded "
              "point of their backbone", flush=True)
    noise = seed_noise(table)
    if noise:
        print(noise, flush=True)
    t0 = time.perf_counter()
    curves, be, bs = run_all(args, table, names)
    out = {}
    for axis, budget, unit in (("epochs", be, "trial-epochs"), ("seconds", bs, "recorded seconds")):
        marks = [budget * f for f in FRACTIONS]
        stats = table_at(curves, marks, axis)
        print(f"\nmean held-out AUC of the incumbent (+- 95 % CI half-width over {args.seeds} seeds) vs budget in {unit}")
        print_table(stats, marks, unit)
        checks = target_check(curves, marks, axis, budget)
        print("\n".join(checks))
        shifted = table_at(curves, marks, axis, "shifted")
        print("held-out AUC under the stain shift at the full budget: " + ", ".join(
            f"{n} {row[-1][0]:.4f} +-{row[-1][1]:.3f}" for n, row in shifted.items()))
        out[axis] = {"budget": budget, "marks": marks, "heldout": stats, "checks": checks, "shifted": shifted}
    png = plot(curves, {"epochs": be, "seconds": bs}, Path(args.out),
               f"recorded PCam curves ({n_points}/{grid_size} points), {args.seeds} seeds, objective {args.objective}")
    write_atomically(Path(args.out).with_suffix(".json"), json.dumps({"table": args.recorded, "seeds": args.seeds,
                                                               "objective": args.objective, **out}, indent=1))
    print(f"\nwrote {png} and {Path(args.out).with_suffix('.json')}  (total {time.perf_counter() - t0:.0f} s)")
    return 0
