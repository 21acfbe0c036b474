"""Which device a run takes: Ray's assignment inside a trial (checked on a real local Ray with logical GPUs),
--device outside it, the GPU memory cap of a fractional trial, and a CUDA out-of-memory error as one line.

This machine has no GPU: CUDA's presence is faked at one boundary, trainables.device.cuda_device_count (and, in
the fractional trial, torch's memory-cap call is recorded instead of made).
"""
from __future__ import annotations

import os
import re
import sys

import numpy as np
import pytest
import torch

from datasets.errors import UserError
from test_trainables_train import TINY, write_toy_kaggle
from trainables import device as device_mod
from trainables.device import OutOfGPUMemory, check_device, pick_device


@pytest.fixture
def gpus(monkeypatch):
    def set_count(n: int) -> None:
        monkeypatch.setattr(device_mod, "cuda_device_count", lambda: n)
    return set_count


def test_outside_ray_auto_takes_a_gpu_when_there_is_one_and_device_chooses(gpus, monkeypatch):
    gpus(0)
    assert pick_device().type in ("cpu", "mps")
    with pytest.raises(UserError, match="--device cuda: this machine has 0 CUDA device.*--device cpu"):
        pick_device("cuda")
    gpus(2)
    assert pick_device() == torch.device("cuda", 0)
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match="cuda:2: this machine has 2 CUDA device.*cuda:0..cuda:1"):
        pick_device("cuda:2")
    for bad in ("gpu", "cuda:x", "CUDA"):
        with pytest.raises(UserError, match="--device .*choose auto"):
            check_device(bad)


def test_inside_a_trial_the_device_is_rays_assignment_not_what_is_visible(gpus, monkeypatch, capsys):
    gpus(4)
    assert pick_device("auto", assigned_gpus=[]) == torch.device("cpu")  # a 0-GPU trial on a GPU host
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # Ray's override: the assigned ids, in order
    assert pick_device("auto", assigned_gpus=["3"]) == torch.device("cuda", 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: ids are indices
    assert pick_device("auto", assigned_gpus=["3"]) == torch.device("cuda", 3)
    gpus(0)  # a node declaring GPUs that torch cannot use: the CPU, said in the trial's log
    assert pick_device("auto", assigned_gpus=["0"]) == torch.device("cpu")
    assert re.match(r"warning: Ray assigned GPU\(s\) \['0'\] .* torch sees no CUDA device here: training on the CPU",
                    capsys.readouterr().err)


def test_claiming_a_gpu_fraction_caps_its_memory_and_a_cpu_is_left_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: calls.append((f, d)))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    device_mod.claim_device(torch.device("cpu"), 0.5)
    assert calls == [] and torch.backends.cudnn.benchmark is False
    device_mod.claim_device(torch.device("cuda", 0), 0.25)
    assert calls == [(0.25, torch.device("cuda", 0))] and torch.backends.cudnn.benchmark is True
    device_mod.claim_device(torch.device("cuda", 0), 1.0)  # a whole GPU: no cap
    assert len(calls) == 1


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory):
    from datasets.cache import prepare_dataset
    folder = write_toy_kaggle(tmp_path_factory.mktemp("toy") / "data", n=64)
    return prepare_dataset(str(folder), str(tmp_path_factory.mktemp("cache")), progress=False)


def test_cuda_out_of_memory_ends_fit_in_one_line_naming_backbone_and_batch_size(toy_cache, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr("trainables.engine.model_step", oom)
    with pytest.raises(OutOfGPUMemory) as err:
        from trainables.train import fit
        fit({**TINY, "epochs": 1}, toy_cache, np.arange(32))
    msg = str(err.value)
    assert msg.startswith("out of GPU memory (baseline, batch size 16) on cpu: ") and "\n" not in msg
    assert "--gpus-per-trial" in msg and "smaller batch size" in msg and "Tried to allocate 2.00 GiB" in msg


# --- a real local Ray with a logical GPU ------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_with_a_gpu():
    """Ray on this machine declaring one (logical) GPU: Ray schedules and assigns it as a real one."""
    import ray

    was_up = ray.is_initialized()
    if was_up:  # another module's Ray has no GPU: this module needs its own
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()
    if was_up:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)


def device_trial(config, cache_path):
    """In the trial's worker, CUDA reports one device (a 1-GPU host; faked at trainables.device's boundary:
    faking torch.cuda.is_available itself sends torch's own optimizer checks to the missing driver). A 0-GPU
    trial runs the real train_pcam (and must train on the CPU); a GPU trial reports what train_pcam's device
    choice gives (torch cannot run on a faked GPU), with the memory cap it asked for."""
    from ray import tune

    from trainables import device
    from trainables.train import train_pcam

    device.cuda_device_count = lambda: 1
    caps = []
    torch.cuda.set_per_process_memory_fraction = lambda fraction, dev=None: caps.append((fraction, str(dev)))
    if config["gpu"] == 0:
        return train_pcam(config["train"], cache_path=cache_path)
    dev = device.trial_device(in_ray_trial=True)
    tune.report({"device": str(dev), "memory_caps": str(caps), "visible": os.environ.get("CUDA_VISIBLE_DEVICES")})


def test_a_trial_runs_where_ray_put_it(ray_with_a_gpu, toy_cache, tmp_path):
    import ray.cloudpickle
    from ray import tune

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    trainable = tune.with_resources(tune.with_parameters(device_trial, cache_path=str(toy_cache.path)),
                                    lambda config: {"cpu": 1, "gpu": config["gpu"]})
    tuner = tune.Tuner(trainable, param_space={"gpu": tune.grid_search([0, 0.5]), "train": {**TINY, "epochs": 1}},
                       run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), verbose=0,
                                                 failure_config=tune.FailureConfig(max_failures=0)))
    grid = tuner.fit()
    assert not grid.errors, grid.errors
    by_gpu = {r.config["gpu"]: r.metrics for r in grid}
    # 0 GPUs on a host whose CUDA reports a device: the CPU (Ray 2.60 leaves CUDA visible to it).
    assert by_gpu[0]["device"] == "cpu" and by_gpu[0]["trial_status"] == "completed"
    # Half the GPU: Ray's assigned device, capped at half its memory.
    assert by_gpu[0.5]["visible"] == "0" and by_gpu[0.5]["device"] == "cuda:0"
    assert by_gpu[0.5]["memory_caps"] == "[(0.5, 'cuda:0')]"
