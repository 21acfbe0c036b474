"""An event-driven simulation of a Ray Tune search over the recorded table: asynchronous trials, real objects.

Fifty seeds of five strategies with a real ``Tuner`` each would take hours on 2 cores (a Tuner's start, its
actors and its bookkeeping cost far more than replaying a curve). This replays the same search in a loop instead,
calling the *same objects* in the order Ray 2.60's TuneController calls them (``_process_trial_result``,
``stop_trial``): the searcher behind Ray's ``ConcurrencyLimiter`` (``max_concurrent_trials``), the scheduler,
and the run's callback ``SchedulerStopMarker``. Per result: scheduler.on_trial_result -> STOP marks it done;
otherwise searcher.on_trial_result -> the callback -> the trial's last result. A function trainable that returns
by itself sends Ray's duplicate of its last result (done) through scheduler and searcher again. A stopped or
finished trial: scheduler.on_trial_complete, then searcher.on_trial_complete(last result), and a free slot asks
the searcher for the next trial. Time: each trial's epochs take their recorded seconds; ``concurrency`` trials
run at once. tests/test_search_bench_replay.py checks that a real Tuner takes the same decisions.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from search.bench.replay import Table, replay_results


@dataclass
class SimTrial:
    """What the scheduler and the callback read of a Ray Trial."""

    trial_id: str
    config: dict
    results: list[dict]
    next: int = 0
    last_result: dict = field(default_factory=dict)


@dataclass
class Point:
    """The incumbent once ``epochs`` trial-epochs and ``seconds`` of search time were spent."""

    epochs: int
    seconds: float
    val: float
    heldout: float
    shifted: float
    trial: str
    config: dict


@dataclass
class SimResult:
    curve: list[Point]
    trials: list[tuple[str, dict, str, int]]  # (trial id, config, how it ended, epochs run), in start order
    rejected: int = 0


def simulate(searcher, scheduler, table: Table, *, max_epochs: int, concurrency: int, num_samples: int = -1,
             stop_epochs: int | None = None, stop_seconds: float | None = None, objective: str = "best",
             max_rejections: int = 20000) -> SimResult:
    """Run one search to its budget (trial-epochs and/or seconds: it goes on until both are spent)."""
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.search import ConcurrencyLimiter

    from search.outcome import MODE, OBJECTIVE, decide
    from search.searcher import SchedulerStopMarker

    scheduler.set_search_properties(OBJECTIVE, MODE)
    limiter = ConcurrencyLimiter(searcher, max_concurrent=concurrency)
    marker = SchedulerStopMarker(max_epochs)
    live: dict[str, SimTrial] = {}
    heap: list[tuple[float, int, str]] = []
    out = SimResult([], [])
    best: dict[str, tuple[float, int]] = {}  # trial -> (objective, best epoch): the strategy's own pick
    trials: dict[str, SimTrial] = {}
    clock, used, started, ids, seq = 0.0, 0, 0, 0, 0

    def spent() -> bool:  # every budget given is spent (none given: num_samples ends the search)
        budgets = [(stop_epochs, used), (stop_seconds, clock)]
        return any(b is not None for b, _ in budgets) and all(b is None or x >= b for b, x in budgets)

    def launch():
        nonlocal started, ids, seq
        while len(live) < concurrency and (num_samples < 0 or started < num_samples) and not spent():
            tid = f"t{ids:05d}"
            ids += 1
            config = limiter.suggest(tid)
            if config is None:
                return
            record = table.lookup(config)
            if record is None:  # not recorded (a partial table): FAIL, nothing spent, propose again
                limiter.on_trial_complete(tid, None, error=True)
                out.rejected += 1
                if out.rejected > max_rejections:
                    raise RuntimeError("the searcher keeps proposing grid points the table does not hold")
                continue
            started += 1
            trial = SimTrial(tid, config, replay_results(record, max_epochs, objective))
            live[tid] = trials[tid] = trial
            scheduler.on_trial_add(None, trial)
            heapq.heappush(heap, (clock + trial.results[0]["epoch_seconds"], seq, tid))
            seq += 1

    def complete(trial: SimTrial):
        scheduler.on_trial_complete(None, trial, trial.last_result)
        limiter.on_trial_complete(trial.trial_id, result=trial.last_result)
        out.trials.append((trial.trial_id, trial.config, decide(trial.last_result, max_epochs).label, trial.next))
        del live[trial.trial_id]

    launch()
    while heap and not spent():
        clock, _, tid = heapq.heappop(heap)
        trial = live[tid]
        result = dict(trial.results[trial.next], training_iteration=trial.next + 1, trial_id=tid)
        trial.next += 1
        used += 1
        if result["trial_status"] == "diverged":  # never the pick (search.run ranks diverged trials last)
            best.pop(tid, None)
        else:
            best[tid] = (result["best_val_auc"], result["best_epoch"])
        if best:  # the incumbent: highest objective (ties: the earlier trial), its model at its best epoch
            inc = max(best, key=lambda t: best[t][0])
            val, at = best[inc]
            r = trials[inc].results[at - 1]
            out.curve.append(Point(used, clock, val, r["heldout_auc"], r["shifted_auc"], inc, trials[inc].config))
        decision = scheduler.on_trial_result(None, trial, result)
        if decision == TrialScheduler.STOP:
            result["done"] = True
        else:
            limiter.on_trial_result(tid, result)
        marker.on_trial_result(iteration=0, trials=[], trial=trial, result=result)
        trial.last_result = result
        if decision == TrialScheduler.STOP:
            complete(trial)
        elif trial.next == len(trial.results):  # the trainable returned: Ray's duplicate of its last result
            trial.last_result["done"] = True
            if scheduler.on_trial_result(None, trial, trial.last_result) != TrialScheduler.STOP:
                limiter.on_trial_result(tid, trial.last_result)
            complete(trial)
        else:
            heapq.heappush(heap, (clock + trial.results[trial.next]["epoch_seconds"], seq, tid))
            seq += 1
        launch()
    return out


def at_budget(curve: list[Point], budget: float, axis: str = "epochs") -> Point | None:
    """The incumbent once ``budget`` (trial-epochs or seconds) was spent; None before the first result."""
    last = None
    for p in curve:
        if getattr(p, axis) > budget:
            break
        last = p
    return last


def mean_ci(values) -> tuple[float, float]:
    """Mean and half-width of its 95 % interval (Student t over seeds)."""
    from scipy import stats

    v = np.asarray([x for x in values if x == x], dtype=float)
    if len(v) < 2:
        return (float(v.mean()) if len(v) else float("nan")), float("nan")
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
