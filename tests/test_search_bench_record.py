"""search.bench.record.record_one trains a grid point with the product's own fit and scores every epoch on the
held-out patches, for both training paths: a network fine-tuned end to end, and a head on the embedding cache
(unfreeze_depth 0, whose checkpoints hold the head only)."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

from search.bench import record as bench_record


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from datasets.cache import prepare_dataset
    from datasets.synthetic import write_kaggle_layout

    root = tmp_path_factory.mktemp("record")
    write_kaggle_layout(root / "pcam", n=96, seed=0)
    cache = prepare_dataset(root / "pcam", root / "cache", progress=False)
    rows = cache.indices("train")
    tr, va, held = rows[:32], rows[32:56], rows[56:80]
    x = np.ascontiguousarray(cache.images[held])
    return cache, (tr, va), (x, bench_record.stain_shift(x), cache.labels[held],
                             bench_record.stain_shift(np.ascontiguousarray(cache.images[va])))


@pytest.mark.parametrize("config", [
    {"backbone": "baseline_bn", "lr": 1e-3, "weight_decay": 1e-5, "aug_strength": 0.5, "batch_size": 32,
     "unfreeze_depth": None, "seed": 0},
    {"backbone": "mobilenet_v2", "lr": 1e-3, "weight_decay": 1e-5, "aug_strength": 1.0, "batch_size": 32,
     "unfreeze_depth": 0, "seed": 0},
], ids=["fine-tuned", "head-on-cached-features"])
def test_every_epoch_is_scored_on_the_held_out_patches(tiny, config):
    cache, rows, held = tiny
    rec = bench_record.record_one(config, cache, rows, held, argparse.Namespace(max_epochs=2, precision="fp32"))
    assert rec["key"] == bench_record.config_key(config) and [e["epoch"] for e in rec["epochs"]] == [1, 2]
    for e in rec["epochs"]:
        assert all(0 <= e[k] <= 1 for k in ("val_auc", "heldout_auc", "shifted_auc", "val_shifted_auc"))


def test_two_recorders_sharing_the_file_keep_each_others_records(tmp_path):
    """Each shard appends under the lock after re-reading the file, so a recorder that loaded the table before
    another wrote does not drop the other's record (the first version rewrote its own stale copy)."""
    out, setup = tmp_path / "table.json", {"space": "x"}
    a = bench_record.append_to_table(out, setup, run={"who": "a"})
    b = bench_record.append_to_table(out, setup, run={"who": "b"})
    assert len(a["runs"]) == 1 and len(b["runs"]) == 2
    for key in ("k1", "k2", "k1"):  # a duplicate (two shards racing on one point) is kept once
        bench_record.append_to_table(out, setup, record={"key": key, "epochs": []})
    table = bench_record.load_table(out)
    assert [r["key"] for r in table["records"]] == ["k1", "k2"] and len(table["runs"]) == 2
    with pytest.raises(Exception, match="another setup"):
        bench_record.append_to_table(out, {"space": "y"}, record={"key": "k3", "epochs": []})


def test_shards_partition_the_grid_and_bad_shards_are_one_line():
    from datasets.errors import UserError

    grid = [bench_record.config_key(c) for c in bench_record.grid_configs()]
    parts = [[k for i, k in enumerate(grid) if i % 3 == bench_record.shard_of(f"{s}/3")[0]] for s in (1, 2, 3)]
    assert sorted(sum(parts, [])) == sorted(grid) and all(parts)
    for bad in ("0/2", "3/2", "two", "1/0"):
        with pytest.raises(UserError, match="--shard"):
            bench_record.shard_of(bad)
