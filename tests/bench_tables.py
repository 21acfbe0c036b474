"""A small, complete recorded table for the replay tests (deterministic curves, one diverging learning rate)."""
from __future__ import annotations

import numpy as np

from search.bench.record import FORMAT, grid_configs, config_key, write_table

GRID = {"baseline_bn": {"lr": [1e-4, 1e-3, 1e-2, 1e-1], "weight_decay": [1e-5], "aug_strength": [0.0, 0.5],
                        "batch_size": [32], "unfreeze_depth": [None]},
        "mobilenet_v2": {"lr": [1e-4, 1e-3, 1e-2, 1e-1], "weight_decay": [1e-5], "aug_strength": [0.0, 0.5],
                         "batch_size": [32], "unfreeze_depth": [0, 6]}}


def make_table(path, epochs: int = 4, grid: dict = GRID):
    rng = np.random.default_rng(0)
    records = []
    for c in grid_configs(grid, n_second=3):
        # best near lr 1e-3, worse either side (log scale), mobilenet a little better
        quality = 0.92 - 0.05 * abs(np.log10(c["lr"]) + 3) ** 1.5 + 0.02 * (c["backbone"] == "mobilenet_v2")
        eps = []
        for e in range(1, epochs + 1):
            if c["lr"] >= 1e-1 and c["backbone"] == "mobilenet_v2" and e == 2:
                eps.append({"epoch": e, "status": "diverged", "seconds": 1.0, "train_loss": None, "val_loss": None,
                            "val_auc": 0.5})
                break
            v = round(float(quality - 0.15 / e + rng.normal(0, 0.01)), 6)
            eps.append({"epoch": e, "status": "completed" if e == epochs else "running",
                        "seconds": round(float(1 + (c["unfreeze_depth"] or 0) * 0.5 + rng.random()), 3),
                        "train_loss": round(float(0.7 / e), 6), "val_loss": round(float(0.6 / e), 6), "val_auc": v,
                        "heldout_auc": round(v - 0.03 + float(rng.normal(0, 0.01)), 6),
                        "shifted_auc": round(v - 0.06 + 0.02 * c["aug_strength"], 6),
                        "val_shifted_auc": round(v - 0.05 + 0.02 * c["aug_strength"], 6)})
        records.append({"key": config_key(c), "config": c, "epochs": eps, "wall_seconds": 1.0, "run": 0})
    table = {"format": FORMAT, "setup": {"grid": grid, "max_epochs": epochs}, "runs": [], "records": records}
    write_table(path, table)
    return path
