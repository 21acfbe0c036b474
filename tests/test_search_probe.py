"""The probe space end to end with a small timm model built with random weights: a real Ray Tune search (the driver
computes the embedding cache before the trials), the refit (the head on the cached features of every labelled patch),
the submission, and model.pt serving it (backbone + head, TTA over the 8 views)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from search.refit import best as refit_best
from search import run as search_run

BACKBONE = "timm/test_vit"  # 0.3M parameters, fixed 160 px input: also the resize path


@pytest.fixture(scope="module")
def probe_search(ray_local, tmp_path_factory):
    from datasets.synthetic import write_kaggle_layout

    root = tmp_path_factory.mktemp("probe-search")
    write_kaggle_layout(root / "data", n=80, seed=2)
    results = root / "results"
    argv = ["--space", "probe", "--backbones", BACKBONE, "--no-pretrained", "--name", "probe-test",
            "--data-dir", str(root / "data"), "--num-samples", "4", "--max-epochs", "3", "--results-dir", str(results),
            "--cache-dir", str(root / "cache"), "--cpus-per-trial", "1", "--max-concurrent", "2", "--seed", "1"]
    search_run._set_env()
    record = search_run.run_search(search_run.make_plan(argv), progress=False)
    return root, results, record


def test_probe_search_trains_heads_on_cached_features(probe_search):
    root, results, record = probe_search
    board = pd.read_csv(results / "probe-test" / "leaderboard.csv")
    assert len(board) == 4 and set(board["backbone"]) == {BACKBONE}
    assert not board["status"].str.startswith("errored").any()
    cfg = record["config"]
    assert cfg["unfreeze_depth"] == 0 and cfg["pretrained"] is False and cfg["aug_strength"] == 1.0
    assert cfg["head"] in ("linear", "mlp") and (cfg["head"] == "linear") == (cfg["head_hidden"] is None)
    features = list((root / "cache" / "embeddings").glob("*/*/features.f16"))
    assert len(features) == 1 and BACKBONE.replace("/", "_") in features[0].parent.name
    meta = json.loads((features[0].parent / "meta.json").read_text())
    assert meta["views"] == 8 and meta["dim"] == 64 and meta["backbone"] == BACKBONE


def test_probe_winner_refits_submits_and_model_pt_serves_it(probe_search):
    root, results, record = probe_search
    assert refit_best.main(["--results-dir", str(results), "--name", "probe-test", "--no-mlflow",
                            "--test-labels", str(root / "data" / "test_labels.csv")]) == 0
    from datasets.cache import open_cache
    from search.refit.ensemble import load_ensemble

    cache = open_cache(record["cache_path"])
    out = results / "probe-test"
    refit = json.loads((out / "refit.json").read_text())
    assert refit["n_train"] == int((cache.split != "test").sum()) and refit["tta"] is True and 0.0 <= refit["test_auc"] <= 1.0
    sub = pd.read_csv(out / "submission.csv")
    sample = pd.read_csv(root / "data" / "sample_submission.csv")
    assert list(sub["id"]) == list(sample["id"]) and sub["label"].between(0, 1).all()
    test = cache.indices("test")
    served = load_ensemble(out / "model.pt")
    (net, cfg), = served.members
    assert cfg["head"] in ("linear", "mlp") and type(net.net).__name__ == "TimmNet"
    probs = served.predict_proba(cache.images[test], tta=True)
    assert np.allclose(probs, sub["label"].to_numpy(), atol=1e-6)
