"""Checkpoints on a real Tuner, as search.run runs it: while the search runs Ray deletes none
(private_api.keeping_checkpoints: its num_to_keep deletion ran ahead of the experiment state, which broke --resume
after a driver's death, tests/test_search_cluster.py); afterwards search.tuner.prune_checkpoints leaves each
finished trial its best epoch and its latest."""
from __future__ import annotations

import os
import tempfile

import pytest

VAL_AUC = [0.5, 0.9, 0.6, 0.7]  # best at epoch 2, latest epoch 4


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    import ray
    from ray import tune

    from search.outcome import MODE

    def curve_trainable(config):  # local: Ray's workers get it by value (the tests folder is no package)
        for epoch, auc in enumerate(VAL_AUC, start=1):
            with tempfile.TemporaryDirectory() as d:
                with open(os.path.join(d, "checkpoint.pt"), "w") as f:
                    f.write(str(epoch))
                tune.report({"epoch": epoch, "val_auc": auc}, checkpoint=tune.Checkpoint.from_directory(d))

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    storage = tmp_path_factory.mktemp("ray")
    tuner = tune.Tuner(curve_trainable, param_space={"x": tune.grid_search([1, 2])},
                       run_config=tune.RunConfig(name="prune", storage_path=str(storage), verbose=0,
                                                 checkpoint_config=tune.CheckpointConfig(
                                                     num_to_keep=1, checkpoint_score_attribute="val_auc",
                                                     checkpoint_score_order=MODE)))
    from search import private_api

    grid, interrupted = private_api.fit_watching_ctrl_c(tuner)
    assert not interrupted
    yield grid
    if started:
        ray.shutdown()


def epochs_on_disk(result) -> list[int]:
    folders = sorted(p for p in os.listdir(result.path) if p.startswith("checkpoint_"))
    return [int(open(os.path.join(result.path, p, "checkpoint.pt")).read()) for p in folders]


def test_finished_trials_keep_their_best_and_latest_checkpoint_and_unfinished_ones_keep_all(grid):
    from search.report import _best_checkpoint_path
    from search.tuner import prune_checkpoints

    first, second = list(grid)
    assert epochs_on_disk(first) == epochs_on_disk(second) == [1, 2, 3, 4]  # nothing deleted during the search
    keep = {_best_checkpoint_path(r, best_epoch=2) for r in (first, second)}
    deleted = prune_checkpoints(grid, keep, unfinished={second.metrics["trial_id"]})
    assert deleted == 2 and epochs_on_disk(first) == [2, 4]  # the leaderboard's best epoch, and the latest
    assert epochs_on_disk(second) == [1, 2, 3, 4]  # --resume would continue it
