"""trainables.bench's section parity: baseline_bn and mobilenet_v2 fitted in fp32 and in bf16 with the same config
and seed; the last epoch's val AUC and the test AUC (when the data has test labels).
"""
from __future__ import annotations

import time

from trainables.bench_figures import in_fresh_process, setup_process


def m_parity(cache_path: str, threads: int, backbone: str, precision: str, epochs: int) -> dict:
    from datasets.cache import open_cache
    setup_process(threads, reuse=True)
    return parity_run(open_cache(cache_path), backbone, precision, epochs)


def parity_run(cache, backbone: str, precision: str, epochs: int, seed: int | None = None) -> dict:
    """Train PARITY_CONFIGS[backbone] in ``precision``: last-epoch val AUC, and the test AUC (scored in
    fp32 with 8-view TTA, so only the training precision differs) when the data has test labels.
    ``seed``: the config's seed (its split, initialisation and batch order) instead of PARITY_CONFIGS'."""
    from sklearn.metrics import roc_auc_score

    from datasets.splits import train_val_split
    from datasets.test_labels import find_test_labels
    from trainables.train import fit, predict_proba, resolve_config
    seeded = {} if seed is None else {"seed": seed}
    cfg = resolve_config({**PARITY_CONFIGS[backbone], "backbone": backbone, "precision": precision, "epochs": epochs,
                          **seeded})
    train_idx, val_idx = train_val_split(cache, val_fraction=float(cfg["val_fraction"]), seed=int(cfg["seed"]))
    t0 = time.perf_counter()
    model, history = fit(cfg, cache, train_idx, val_idx)
    out = {"val_auc": history[-1]["val_auc"], "seconds": time.perf_counter() - t0, "path": history[-1]["fast_path"],
           "test_auc": None}
    test_idx = cache.indices("test")
    labels, _ = find_test_labels(cache, test_idx, cache.ids[test_idx].astype(str), None) if len(test_idx) else (None, None)
    if labels is not None:
        probs = predict_proba(model, cache.images[test_idx], {**cfg, "precision": "fp32"}, tta=True)
        out["test_auc"] = float(roc_auc_score(labels, probs))
    return out


PARITY_CONFIGS = {
    # The README's real-patch configs (tests/test_trainables_realdata.py), fewer epochs.
    "baseline_bn": {"batch_size": 64, "lr": 2e-3, "aug_strength": 0.5, "dropout": 0.3, "val_fraction": 0.15,
                    "seed": 0},
    "mobilenet_v2": {"pretrained": True, "batch_size": 64, "lr": 5e-4, "aug_strength": 0.5, "dropout": 0.2,
                     "val_fraction": 0.15, "warmup_epochs": 0.3, "seed": 0},
}



def section_parity(a, cache_path):
    print(f"(f) AUC parity: the same config and seed trained in fp32 and in bf16 ({a.parity_epochs} epochs; "
          f"test AUC scored in fp32, 8-view TTA)")
    for backbone in ("baseline_bn", "mobilenet_v2"):
        r = {p: in_fresh_process(m_parity, cache_path, a.threads, backbone, p, a.parity_epochs) for p in ("fp32", "bf16")}
        line = "  ".join(f"{p}: val AUC {x['val_auc']:.4f}"
                         + (f", test AUC {x['test_auc']:.4f}" if x["test_auc"] is not None else "")
                         + f" ({x['seconds']:.0f} s, {x['path']})" for p, x in r.items())
        d_val = r["bf16"]["val_auc"] - r["fp32"]["val_auc"]
        d_test = (f", test {r['bf16']['test_auc'] - r['fp32']['test_auc']:+.4f}" if r["fp32"]["test_auc"] is not None else "")
        print(f"  {backbone:13s} {line}   delta AUC bf16 - fp32: val {d_val:+.4f}{d_test}", flush=True)
