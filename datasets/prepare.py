"""Validate a dataset and build (or reuse) its decode-once cache.

    python -m datasets.prepare [--data-dir DIR] [--cache-dir DIR] [--slide-map CSV]

With no --data-dir the embedded synthetic PCam dataset is generated (once) and cached.
"""
from __future__ import annotations

import argparse
import time

from datasets.cache import prepare_dataset
from datasets.defaults import default_cache_root
from datasets.errors import run_cli


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m datasets.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="Kaggle layout (train/, train_labels.csv, test/, sample_submission.csv) or PCam "
                                      "HDF5 folder; default: the embedded synthetic dataset")
    p.add_argument("--cache-dir", help=f"cache root (default $PCAM_TUNE_CACHE or {default_cache_root()})")
    p.add_argument("--slide-map", help="csv id,slide mapping patches to whole-slide images (default: DATA_DIR/slide_map.csv if present)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def describe(cache) -> str:
    lines = [f"dataset: {cache.source.get('kind')} at {cache.source.get('data_dir')}"]
    for split, s in cache.summary().items():
        cls = f"{s['pos']:,} positive / {s['neg']:,} negative" if not s["unlabelled"] else "unlabelled"
        lines.append(f"  {split:5s}: {s['n']:,} images ({cls})")
    if cache.groups is not None:
        lines.append(f"  slides: {len(set(cache.groups[cache.indices('train')].tolist())):,} in train (slide-level validation split)")
    lines.append(f"cache: {cache.path} (fingerprint {cache.fingerprint[:16]})")
    return "\n".join(lines)


@run_cli
def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    t0 = time.perf_counter()
    cache = prepare_dataset(args.data_dir, args.cache_dir, progress=not args.quiet, slide_map=args.slide_map)
    print(describe(cache))
    print(f"ready in {time.perf_counter() - t0:.2f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
