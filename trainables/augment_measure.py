"""Does the geometric augmentation's reach into the label's border ring change test AUC? One measurement, kept so
the figures in docs/training.md can be reproduced:

    python -m trainables.augment_measure --data-dir ../shared/pcam_sample --out /tmp/aug.json [--seeds 0 1]

A PCam patch is positive when its centre 32x32 px holds tumour. Shift and zoom move pixels across that border in
both directions; trainables.augment bounds them by MAX_SHIFT / MAX_ZOOM. Each variant below sets those two bounds,
trains the same config with the same seed (the random draws are the same numbers in every variant: only their
scale differs), and scores the Kaggle test patches with 8-view TTA against their labels. Results are written after
every run, so a stopped measurement keeps what it finished.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from datasets.cache import prepare_dataset
from datasets.errors import run_cli
from datasets.files import write_atomically
from datasets.splits import train_val_split
from datasets.test_labels import find_test_labels
from trainables import augment
from trainables.loop import fit
from trainables.model_files import predict_proba

# name -> (MAX_SHIFT px, MAX_ZOOM) at strength 1.
VARIANTS = {"wide (8 px, 15 %)": (8, 0.15), "bounded (2 px, 5 %)": (2, 0.05), "none (dihedral + colour)": (0, 0.0)}
CONFIG = {"backbone": "baseline_bn", "epochs": 6, "batch_size": 64, "lr": 2e-3, "aug_strength": 1.0,
          "precision": "auto"}


def measure(data_dir: str, seeds: list[int], out: Path, epochs: int, variants: list[str] | None = None) -> list[dict]:
    cache = prepare_dataset(data_dir, progress=False)
    train_idx, val_idx = train_val_split(cache, 0.2, seed=0)
    test_idx = cache.indices("test")
    test_y, _ = find_test_labels(cache, test_idx, cache.ids[test_idx], None)
    rows, saved = [], (augment.MAX_SHIFT, augment.MAX_ZOOM)
    try:
        for seed in seeds:
            for name, (shift, zoom) in VARIANTS.items():
                if variants and name.split()[0] not in variants:
                    continue
                augment.MAX_SHIFT, augment.MAX_ZOOM = shift, zoom
                cfg = {**CONFIG, "epochs": epochs, "seed": seed}
                t0 = time.perf_counter()
                model, history = fit(cfg, cache, train_idx, val_idx)
                probs = predict_proba(model, cache.images[test_idx], cfg, tta=True)
                row = {"variant": name, "max_shift": shift, "max_zoom": zoom, "seed": seed, "epochs": epochs,
                       "val_auc_last": history[-1].get("val_auc"), "test_auc": float(roc_auc_score(test_y, probs)),
                       "seconds": round(time.perf_counter() - t0, 1)}
                rows.append(row)
                np.save(out.with_name(f"{out.stem}-{shift}-{zoom}-{seed}.npy"), probs)
                write_atomically(out, json.dumps({"config": CONFIG, "test_labels": test_y.tolist(), "runs": rows}, indent=1))
                print(json.dumps(row), flush=True)
    finally:
        augment.MAX_SHIFT, augment.MAX_ZOOM = saved
    return rows


def paired_difference(labels, probs_a, probs_b, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """AUC(a) - AUC(b) on the same test patches, with a 95 % paired bootstrap interval (patches resampled once for
    both, so the noise of the test set itself mostly cancels)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    diff = roc_auc_score(labels, probs_a) - roc_auc_score(labels, probs_b)
    draws = []
    for _ in range(n_boot):
        i = rng.integers(0, len(labels), len(labels))
        if 0 < labels[i].sum() < len(i):
            draws.append(roc_auc_score(labels[i], probs_a[i]) - roc_auc_score(labels[i], probs_b[i]))
    lo, hi = np.quantile(draws, [0.025, 0.975])
    return float(diff), float(lo), float(hi)


@run_cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m trainables.augment_measure", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", type=Path, required=True, help="json of the runs (per-run test probabilities beside it)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=CONFIG["epochs"])
    p.add_argument("--variants", nargs="+", choices=[v.split()[0] for v in VARIANTS], help="default: all")
    a = p.parse_args(argv)
    measure(a.data_dir, a.seeds, a.out, a.epochs, a.variants)


if __name__ == "__main__":
    main()
