"""Benchmark: the decode-once cache against the notebooks' per-image PIL path, in one process.

    python -m datasets.bench [--data-dir DIR] [--batch-size 256] [--batches 200]

Measures images/s of (a) building the cache (decode every tif once, in parallel), (b) random
batches read from the memory-mapped cache, (c) the per-sample path notebook solutions use
(open tif -> np.array, one image at a time), and prints the ratio (b)/(c).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from datasets.cache import prepare_dataset
from datasets.errors import run_cli

DEFAULT_REAL = Path(__file__).resolve().parents[1].parent / "shared" / "pcam_sample"


def bench_build(data_dir: Path | None) -> tuple[object, float]:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cache = prepare_dataset(data_dir, tmp, progress=False)
        seconds = time.perf_counter() - t0
        n = len(cache)
    return n / seconds, seconds


def bench_cache_reads(cache, batch_size: int, batches: int, rng) -> float:
    rows = cache.indices("train")
    np.asarray(cache.images[rows[: batch_size]])  # touch the file once, as every epoch after the first does
    t0 = time.perf_counter()
    for _ in range(batches):
        idx = np.sort(rng.choice(rows, batch_size, replace=False))
        batch = np.ascontiguousarray(cache.images[idx])
    assert batch.shape == (batch_size, 96, 96, 3)
    return batch_size * batches / (time.perf_counter() - t0)


def bench_pil_per_image(cache, n_images: int, rng) -> float:
    data_dir = Path(cache.source["data_dir"])
    ids = cache.ids[rng.choice(cache.indices("train"), n_images, replace=False)]
    t0 = time.perf_counter()
    for i in ids:  # what a notebook Dataset.__getitem__ does, one sample at a time
        arr = np.array(Image.open(data_dir / "train" / f"{i}.tif"))
    assert arr.shape == (96, 96, 3)
    return n_images / (time.perf_counter() - t0)


@run_cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m datasets.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help=f"Kaggle layout (default: {DEFAULT_REAL} if present, else the synthetic data)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--pil-images", type=int, default=2000)
    a = p.parse_args(argv)
    data_dir = a.data_dir or (DEFAULT_REAL if (DEFAULT_REAL / "train_labels.csv").is_file() else None)
    rng = np.random.default_rng(0)
    print(f"data: {data_dir or 'embedded synthetic'}")
    build_rate, build_s = bench_build(Path(data_dir) if data_dir else None)
    print(f"(a) cache build        : {build_rate:10,.0f} images/s  ({build_s:.1f}s, decoded once)")
    with tempfile.TemporaryDirectory() as tmp:
        cache = prepare_dataset(data_dir, tmp, progress=False)
        read_rate = bench_cache_reads(cache, a.batch_size, a.batches, rng)
        pil_rate = bench_pil_per_image(cache, min(a.pil_images, len(cache.indices("train"))), rng)
        del cache
    print(f"(b) cache batch reads  : {read_rate:10,.0f} images/s  (random batches of {a.batch_size})")
    print(f"(c) per-image PIL path : {pil_rate:10,.0f} images/s  (open tif -> array, per sample)")
    print(f"ratio (b)/(c): {read_rate / pil_rate:.0f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
