"""A trial that runs out of GPU memory, in a real search (Ray Tuner + TPE study + MLflow children): the one outcome
"out of GPU memory (backbone, batch size)" reaches the leaderboard, its MLflow child (FAILED), TPE (FAIL) and the
summary's advice. The error is torch's own torch.cuda.OutOfMemoryError, raised from inside the real train_pcam's
training step (this machine has no GPU to exhaust)."""
from __future__ import annotations

import sys

import optuna
import pytest
import torch

from search import report, searcher, tracking, trial_runs
from search.outcome import decide, what_to_change
from test_trainables_train import write_toy_kaggle

NAME = "oom"


def define(trial):
    trial.suggest_float("lr", 1e-3, 3e-3, log=True)
    return {"backbone": "baseline_bn", "pretrained": False, "epochs": 1, "max_train_samples": 48,
            "batch_size": 64 if trial.number == 0 else 32}


def oom_at_batch_64(config, cache_path):
    """train_pcam, whose training step raises CUDA's out-of-memory error for the batch-64 trial."""
    from trainables import engine
    from trainables.train import train_pcam

    real = engine.model_step

    def step(*args, **kwargs):
        if config["batch_size"] == 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                              "capacity of 15.77 GiB of which 1.12 GiB is free.")
        return real(*args, **kwargs)
    engine.model_step = step
    try:
        return train_pcam(config, cache_path=cache_path)
    finally:
        engine.model_step = real


@pytest.fixture(scope="module")
def oom_search(ray_local, tmp_path_factory):
    import ray.cloudpickle
    from ray import tune

    from datasets.cache import prepare_dataset

    tmp = tmp_path_factory.mktemp("oom")
    cache = prepare_dataset(str(write_toy_kaggle(tmp / "data", n=64)), str(tmp / "cache"), progress=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    uri, storage = f"sqlite:///{tmp}/mlflow.db", f"sqlite:///{tmp}/optuna.db"
    parent, _ = tracking.open_parent_run(uri, NAME, str(tmp / "ray" / NAME), {"space": "test"})
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(oom_at_batch_64, cache_path=str(cache.path)), {"cpu": 1}),
        tune_config=tune.TuneConfig(metric="best_val_auc", mode="max", num_samples=2, max_concurrent_trials=1,
                                    search_alg=searcher.make_searcher(define, seed=0, num_samples=2, max_t=1,
                                                                      storage_url=storage, study_name=NAME)),
        run_config=tune.RunConfig(name=NAME, storage_path=str(tmp / "ray"), verbose=0,
                                  callbacks=[trial_runs.MlflowTrialCallback(uri, NAME, parent, 1)],
                                  failure_config=tune.FailureConfig(max_failures=0)))
    summaries = report.summarize(tuner.fit(), max_epochs=1)
    searcher.settle_study(storage, NAME, {s.trial_id: (s.outcome, s.last_result) for s in summaries})
    return summaries, uri, parent, searcher.load_study(storage, NAME)


LABEL = "out of GPU memory (baseline_bn, batch size 64)"


def test_out_of_memory_reaches_the_leaderboard_mlflow_and_tpe_as_a_failure(oom_search):
    summaries, uri, parent, study = oom_search
    by_batch = {s.config["batch_size"]: s for s in summaries}
    oom, ok = by_batch[64], by_batch[32]
    assert oom.outcome.kind == "gpu_memory" and oom.status == LABEL and not oom.outcome.ranked
    assert ok.status == "completed"
    board = report.leaderboard(summaries)
    assert list(board["status"]) == ["completed", LABEL]  # ranked last, named
    mlf = tracking.client(uri)
    kids = tracking.child_runs(mlf, mlf.get_experiment_by_name(NAME).experiment_id, parent)
    child = kids[oom.trial_id]
    assert child.info.status == "FAILED" and child.data.tags["outcome"] == LABEL
    assert "Tried to allocate 2.00 GiB" in child.data.tags.get("error", "")
    states = {t.user_attrs[searcher.RAY_TRIAL_ID]: t.state for t in study.get_trials(deepcopy=False)}
    assert states == {oom.trial_id: optuna.trial.TrialState.FAIL, ok.trial_id: optuna.trial.TrialState.COMPLETE}
    advice = what_to_change([s.outcome for s in summaries])
    assert advice.startswith("1 trial(s) ran out of GPU memory") and "--gpus-per-trial" in advice


def test_torchs_own_out_of_memory_error_is_the_same_kind():
    raw = "Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB"
    out = decide({"epoch": 2}, 5, error=raw)
    assert (out.kind, out.label, out.optuna_state, out.mlflow_status) == ("gpu_memory", "out of GPU memory", "FAIL",
                                                                         "FAILED")
    assert decide({"epoch": 2}, 5, error="ValueError: boom").kind == "errored"
    assert what_to_change([decide(None, 5, error="ValueError: boom")]) == ""


def test_rays_host_memory_kill_is_not_out_of_gpu_memory():
    """Ray's own OutOfMemoryError is its memory monitor killing a worker for host RAM: an error, with no advice
    to change --gpus-per-trial."""
    from ray.exceptions import OutOfMemoryError

    host = "Task was killed due to the node running low on memory."
    for error in (f"Traceback ...\nray.exceptions.OutOfMemoryError: {host}", OutOfMemoryError(host),
                  OutOfMemoryError(f"{host}\nMemory on the node was 7.6GB / 7.7GB (0.98)")):
        out = decide({"epoch": 1}, 5, error=error)
        assert out.kind == "errored" and not out.label.startswith("out of GPU memory"), out
        assert what_to_change([out]) == ""
    assert decide(None, 5, error="torch.cuda.OutOfMemoryError: Tried to allocate 2.00 GiB").kind == "gpu_memory"
