"""A trial whose network blows up is reported as diverged (val AUC 0.5, no checkpoint; FAIL for TPE), never an
error, also when its training loss still looked finite and only the validation predictions are not (seen with
baseline_bn at lr 1e6: a finite last batch, NaN scores after it). Both training paths: fit and the probe head."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from trainables import engine, probe
from trainables.loop import fit


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    from datasets.cache import prepare_dataset
    from datasets.synthetic import write_kaggle_layout

    root = tmp_path_factory.mktemp("diverged")
    write_kaggle_layout(root / "pcam", n=128, seed=0)
    return prepare_dataset(root / "pcam", root / "cache", progress=False)


def _run(cache, **cfg):
    rows = cache.indices("train")
    seen = []
    _, history = fit({"pretrained": False, "epochs": 2, "batch_size": 16, "seed": 0, "lr": 1e-3, **cfg}, cache,
                     rows[:48], rows[48:96], on_epoch=lambda m, state, preds: seen.append(state))
    return history, seen


def _diverged(history, seen):
    last = history[-1]
    assert last["trial_status"] == "diverged" and last["val_auc"] == 0.5 and np.isnan(last["val_loss"])
    assert last["epoch"] == 1 and seen == [None]  # no checkpoint of a blown-up net, no second epoch


def test_nan_validation_scores_with_a_finite_training_loss_are_a_divergence(tiny_cache, monkeypatch):
    monkeypatch.setattr(engine, "predict_views", lambda model, images, cfg, idx, **kw: np.full(len(idx), np.nan))
    _diverged(*_run(tiny_cache, backbone="baseline_bn"))


class _NanWhenEvaluating(nn.Module):
    def forward(self, x):
        return x if self.training else x * float("nan")


def test_a_probe_head_with_nan_scores_is_a_divergence(tiny_cache, monkeypatch):
    class Emb:  # 8 views of features, as the embedding cache holds them (no backbone needed here)
        features = np.random.default_rng(0).normal(size=(len(tiny_cache.labels), 8, 16)).astype(np.float16)
        dim = 16
        path = Path("features-test")

    monkeypatch.setattr(probe, "ensure_embeddings", lambda cache, cfg, progress=False: Emb)
    monkeypatch.setattr(probe, "_training_features", lambda emb, rows, views: torch.from_numpy(
        np.asarray(emb.features[rows][:, views], dtype=np.float32).reshape(-1, emb.dim)))
    monkeypatch.setattr(probe, "probe_head", lambda cfg, dim: nn.Sequential(nn.Linear(dim, 1), _NanWhenEvaluating()))
    monkeypatch.setattr(probe, "model_with_head", lambda cfg, head_state: None)  # the network is not the point
    _diverged(*_run(tiny_cache, backbone="mobilenet_v2", unfreeze_depth=0, head="linear", aug_strength=0.0))
