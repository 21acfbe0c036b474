"""Real PCam patches (../shared/pcam_sample): train on the 3,200 train patches for a few CPU minutes,
score the 800 held-out test patches against test_labels.csv. Slow: run with `pytest -m slow -s`."""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from trainables.train import fit, predict_proba, resolve_config, trial_cpus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sample_cache(pcam_sample_dir, tmp_path_factory):
    from datasets.cache import prepare_dataset
    return prepare_dataset(str(pcam_sample_dir), str(tmp_path_factory.mktemp("cache")), progress=False)


def train_and_score(cache, pcam_sample_dir, config: dict) -> float:
    from datasets.splits import train_val_split
    torch.set_num_threads(trial_cpus())
    cfg = resolve_config(config)
    train_idx, val_idx = train_val_split(cache, val_fraction=cfg["val_fraction"], seed=cfg["seed"])
    t0 = time.perf_counter()
    model, history = fit(cfg, cache, train_idx, val_idx,
                         on_epoch=lambda m, s, p: print(f"  {cfg['backbone']} epoch {m['epoch']}: val_auc "
                                                        f"{m['val_auc']:.4f} train_loss {m['train_loss']:.4f} "
                                                        f"{m['epoch_seconds']:.0f}s", flush=True))
    test_idx = cache.indices("test")
    truth = pd.read_csv(pcam_sample_dir / "test_labels.csv").set_index("id")["label"]
    labels = truth.loc[cache.ids[test_idx]].to_numpy()
    probs = predict_proba(model, cache.images[test_idx], cfg, tta=True)
    auc = roc_auc_score(labels, probs)
    print(f"{cfg['backbone']}: test AUC {auc:.4f} on {len(test_idx)} real test patches "
          f"(best val AUC {max(h['val_auc'] for h in history):.4f}, {time.perf_counter() - t0:.0f}s)", flush=True)
    return auc


def test_baseline_bn_from_scratch_scores_the_real_test_patches(sample_cache, pcam_sample_dir):
    auc = train_and_score(sample_cache, pcam_sample_dir, {
        "backbone": "baseline_bn", "epochs": 8, "lr": 2e-3, "batch_size": 64, "aug_strength": 0.5,
        "dropout": 0.3, "weight_decay": 1e-4, "val_fraction": 0.15})
    assert auc > 0.85


def test_imagenet_mobilenet_v2_scores_the_real_test_patches(sample_cache, pcam_sample_dir):
    from trainables.weights import missing_weights
    if missing_weights(["mobilenet_v2"]):
        pytest.skip("mobilenet_v2 ImageNet weights not cached: python -m trainables.weights import-offline")
    auc = train_and_score(sample_cache, pcam_sample_dir, {
        "backbone": "mobilenet_v2", "pretrained": True, "epochs": 5, "lr": 5e-4, "batch_size": 64,
        "aug_strength": 0.5, "dropout": 0.2, "weight_decay": 1e-4, "val_fraction": 0.15, "warmup_epochs": 0.3})
    assert auc > 0.88


PARITY_SEEDS = (0, 1, 2)


@pytest.mark.parametrize("backbone, epochs", [("baseline_bn", 3), ("mobilenet_v2", 2)])
def test_bf16_training_reaches_the_fp32_auc(sample_cache, backbone, epochs):
    """Issue 10's parity bar, |delta AUC| <= 0.005, on the mean over three seeds of (bf16 - fp32) with the same
    config and seed. One pair is not a measurement of precision: bf16 and fp32 runs part ways after the first
    rounding difference, so a single pair differs by training chaos (measured: +0.0036 and +0.0052 val AUC for
    the same pair of baseline_bn runs on two code versions, 480 validation patches, AUC SE ~0.015); a systematic
    loss from bf16 shows in the mean, chance does not survive averaging as well."""
    from trainables.bench_parity import parity_run
    if backbone == "mobilenet_v2":
        from trainables.weights import missing_weights
        if missing_weights(["mobilenet_v2"]):
            pytest.skip("mobilenet_v2 ImageNet weights not cached: python -m trainables.weights import-offline")
    torch.set_num_threads(trial_cpus())
    deltas = {"val_auc": [], "test_auc": []}
    for seed in PARITY_SEEDS:
        fp32, bf16 = (parity_run(sample_cache, backbone, p, epochs, seed=seed) for p in ("fp32", "bf16"))
        print(f"{backbone} seed {seed}: fp32 {fp32}, bf16 {bf16}", flush=True)
        assert fp32["path"].startswith("fp32") and bf16["path"].startswith("bf16")
        for k in deltas:
            deltas[k].append(bf16[k] - fp32[k])
    print(f"{backbone}: delta bf16 - fp32 per seed {deltas}", flush=True)
    for k, d in deltas.items():
        assert abs(float(np.mean(d))) <= 0.005, (k, d)
