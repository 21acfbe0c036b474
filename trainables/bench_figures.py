"""How trainables.bench takes and prints a figure: each measurement in a fresh process, the variants of a
figure alternating within each repeat, the median of the repeats with its min-max, ratios per repeat.
"""
from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

from trainables.fastpath import FastPath, reuse_freed_memory


def setup_process(threads: int, reuse: bool) -> None:
    """A measurement process's torch threads, and the allocator setting (process-wide, one-way)."""
    torch.set_num_threads(threads)
    if reuse:
        reuse_freed_memory()


def open_train_rows(cache_path: str):
    """(cache, its 'train' rows) in a measurement process."""
    from datasets.cache import open_cache
    cache = open_cache(cache_path)
    return cache, cache.indices("train")


def path_for(variant: str, backbone: str, device, training: bool = True) -> FastPath:
    """'before' = this project's previous path (fp32 NCHW); 'fp32' / 'auto' = the --precision values."""
    from trainables.fastpath import choose
    if variant == "before":
        return FastPath(device.type, False, False, "previous path")
    return choose(variant, backbone, device, training)



def timed(batches, n_batches: int, step=None, warmup: int = 2) -> float:
    """images/s over ``n_batches`` after ``warmup`` batches (with their step) that are not timed.

    The warm-up keeps one-off costs out of a steady-state rate, on both sides: torch's first calls and
    the allocator's first pages in a fresh process, the notebook DataLoader's worker start-up (whose
    workers then have up to 2 batches each prefetched when the clock starts: a bias in its favour).
    """
    it = iter(batches)
    for _ in range(warmup):
        x, y = next(it)
        if step is not None:
            step(x, y)
    t0, seen = time.perf_counter(), 0
    for i, (x, y) in enumerate(it):
        if step is not None:
            step(x, y)
        seen += len(x)
        if i + 1 == n_batches:
            break
    if seen and torch.cuda.is_available():
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - t0)


def in_fresh_process(fn, *args) -> dict:
    # One process per measurement (max_tasks_per_child=1): a clean allocator and no warmed caches.
    with ProcessPoolExecutor(1, mp_context=get_context("spawn"), max_tasks_per_child=1) as ex:
        return ex.submit(fn, *args).result()



# --- reporting ----------------------------------------------------------------------------------

def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    """median (min-max)"""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def run_variants(repeats: int, variants: dict) -> dict[str, list[dict]]:
    """{name: [result per repeat]}: in each repeat every variant once, in turn."""
    out = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (fn, args) in variants.items():
            out[name].append(in_fresh_process(fn, *args))
    return out


def ratios(results: dict, num: str, den: str) -> list[float]:
    return [a["ips"] / b["ips"] for a, b in zip(results[num], results[den])]


def print_row(label: str, results: list[dict], extra: str = "") -> None:
    path = results[0].get("path")
    print(f"    {label:34s} {spread([r['ips'] for r in results]):>24s} img/s"
          f"{'   [' + path + ']' if path else ''}{extra}", flush=True)


def print_ratio(label: str, values: list[float]) -> None:
    print(f"    {label:34s} {spread(values, '{:.2f}'):>24s} x", flush=True)

