"""Recover each Kaggle patch's whole-slide image from the public PCam release, for leak-free validation.

    python -m datasets.slide_map --kaggle DIR --pcam-h5 DIR --out slide_map.csv

The Kaggle set is PCam without its duplicates, and PCam's `camelyonpatch_level_2_split_*_meta.csv` files name
each patch's slide (`wsi`). So a Kaggle patch's slide is the slide of the PCam patch with the same pixels:
1. exact match: a hash of the 96x96x3 bytes (what almost every patch gets);
2. near-duplicate fallback, for patches whose bytes differ slightly (re-encoding): the PCam patch nearest in a
   small block-mean signature, accepted only when the two patches differ by at most --tolerance grey levels
   on average over all pixels.
Patches matched by neither get a slide of their own (``unmatched:<id>``): they split like patches, and the
report says how many there are. The csv (id,slide) is what --slide-map takes (datasets.prepare, search.run).
"""
from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import numpy as np

from datasets.errors import DataError, UserError, run_cli

_BLOCK = 12  # 96 / 12 = 8 x 8 block means per channel: a 192-number signature per patch


def pixel_hash(patch: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(patch).tobytes(), digest_size=16).digest()


def signature(patches: np.ndarray) -> np.ndarray:
    """(N, 96, 96, 3) uint8 -> (N, 192) float32 block means: close for near-identical patches."""
    n = len(patches)
    x = patches.reshape(n, 96 // _BLOCK, _BLOCK, 96 // _BLOCK, _BLOCK, 3).astype(np.float32)
    return x.mean(axis=(2, 4)).reshape(n, -1)


def read_pcam_slides(pcam_dir: Path, progress: bool = True):
    """Every PCam patch of the release in ``pcam_dir``: (hash -> slide, signatures, slides, reader of rows)."""
    from datasets import pcam_h5

    if not pcam_h5.is_pcam_h5_layout(pcam_dir):
        raise UserError(f"--pcam-h5 {pcam_dir}: no camelyonpatch_level_2_split_*_x.h5[.gz] files there")
    by_hash: dict[bytes, str] = {}
    sigs, slides, blocks = [], [], []
    from datasets.progress import bar as progress_bar

    for split in pcam_h5.SPLITS:
        x = pcam_h5._file(pcam_dir, split, "x")
        if x is None:
            continue
        with pcam_h5._Opened(x, "x") as ds:
            wsi = pcam_h5.read_slides(pcam_dir, split, len(ds))
            if wsi is None:
                raise DataError(f"{pcam_h5.meta_file(pcam_dir, split)}: not found; the slide of each PCam patch comes "
                                f"from the release's meta csvs: put them beside the .h5 files")
            for i in progress_bar(range(0, len(ds), 4096), desc=f"hash PCam {split}", enabled=progress, leave=False):
                block = np.asarray(ds[i:i + 4096])
                for j, patch in enumerate(block):
                    by_hash.setdefault(pixel_hash(patch), wsi[i + j])
                sigs.append(signature(block))
                blocks.append((x, split, i, len(block)))
            slides.append(wsi)
    return by_hash, np.concatenate(sigs), np.concatenate(slides), blocks


def near_matches(queries: np.ndarray, sigs: np.ndarray, pcam_dir: Path, blocks, tolerance: float
                 ) -> list[int | None]:
    """Index (into the PCam rows) of each query's near-duplicate, or None when none is within tolerance."""
    from sklearn.neighbors import NearestNeighbors

    from datasets import pcam_h5

    if not len(queries):
        return []
    nn = NearestNeighbors(n_neighbors=1).fit(sigs)
    rows = nn.kneighbors(signature(queries), return_distance=False)[:, 0]
    starts = np.cumsum([0] + [b[3] for b in blocks])
    which = np.searchsorted(starts, rows, side="right") - 1
    out: list[int | None] = [None] * len(queries)
    for x in dict.fromkeys(b[0] for b in blocks):  # each file opened (and ungzipped) once
        todo = [k for k in range(len(queries)) if blocks[which[k]][0] == x]
        if not todo:
            continue
        with pcam_h5._Opened(x, "x") as ds:
            for k in todo:
                b = blocks[which[k]]
                cand = np.asarray(ds[b[2] + rows[k] - starts[which[k]]])
                diff = np.abs(cand.astype(np.int16) - queries[k].astype(np.int16)).mean()
                out[k] = int(rows[k]) if diff <= tolerance else None
    return out


def build_slide_map(kaggle_dir: Path, pcam_dir: Path, tolerance: float = 2.0, cache_dir=None, progress: bool = True
                    ) -> tuple[dict[str, str], dict[str, int]]:
    """(id -> slide for every Kaggle train patch, counts {exact, near, unmatched})."""
    from datasets.cache import prepare_dataset

    cache = prepare_dataset(kaggle_dir, cache_dir, progress=progress, slide_map=None)
    if cache.source.get("kind") != "kaggle":
        raise UserError(f"--kaggle {kaggle_dir}: not a Kaggle layout folder (train/ + train_labels.csv)")
    rows = cache.indices("train")
    by_hash, sigs, slides, blocks = read_pcam_slides(pcam_dir, progress)
    mapping, missing = {}, []
    for r in rows:
        slide = by_hash.get(pixel_hash(cache.images[r]))
        if slide is None:
            missing.append(r)
        else:
            mapping[str(cache.ids[r])] = slide
    near = near_matches(cache.images[np.array(missing, dtype=np.int64)], sigs, pcam_dir, blocks, tolerance)
    n_near = 0
    for r, hit in zip(missing, near):
        pid = str(cache.ids[r])
        mapping[pid] = slides[hit] if hit is not None else f"unmatched:{pid}"
        n_near += hit is not None
    counts = {"exact": len(rows) - len(missing), "near": n_near, "unmatched": len(missing) - n_near}
    return {str(cache.ids[r]): mapping[str(cache.ids[r])] for r in rows}, counts


def write_slide_map(path: Path, mapping: dict[str, str]) -> None:
    import pandas as pd

    from datasets.files import atomic_path

    with atomic_path(path) as tmp:
        pd.DataFrame({"id": list(mapping), "slide": list(mapping.values())}).to_csv(tmp, index=False)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m datasets.slide_map", description=__doc__.split("\n\n")[0])
    p.add_argument("--kaggle", required=True, help="Kaggle layout folder (train/ + train_labels.csv)")
    p.add_argument("--pcam-h5", required=True, help="folder of the PCam release: *_x.h5[.gz] and *_meta.csv")
    p.add_argument("--out", required=True, help="csv to write (id,slide); pass it as --slide-map")
    p.add_argument("--tolerance", type=float, default=2.0,
                   help="near-duplicate fallback: mean absolute pixel difference accepted (grey levels, default 2)")
    p.add_argument("--cache-dir", help="decode-once cache root")
    p.add_argument("--quiet", action="store_true")
    return p


@run_cli
def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    t0 = time.perf_counter()
    mapping, counts = build_slide_map(Path(args.kaggle).expanduser().resolve(), Path(args.pcam_h5).expanduser().resolve(),
                                      args.tolerance, args.cache_dir, progress=not args.quiet)
    write_slide_map(Path(args.out), mapping)
    n = len(mapping)
    found = sorted({s for s in mapping.values() if not s.startswith("unmatched:")})
    print(f"{n:,} Kaggle train patches: {counts['exact']:,} matched exactly, {counts['near']:,} as near-duplicates, "
          f"{counts['unmatched']:,} unmatched (each its own slide); {len(found):,} slides; "
          f"wrote {args.out} in {time.perf_counter() - t0:.1f}s")
    if counts["unmatched"]:
        print(f"note: {counts['unmatched']:,} unmatched patches split like patches; check that --pcam-h5 holds the "
              f"whole release (train, valid and test)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
