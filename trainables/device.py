"""Where a model runs: the device a process or a Ray trial may use, its GPU memory cap, and feeding a GPU.

The rule (docs/training.md):

- Inside a Ray trial the device is what Ray assigned, never what happens to be visible. Ray 2.60 no longer hides
  the GPUs from a worker given 0 GPUs (``ray._private.utils.set_visible_accelerator_ids`` skips the override
  when no ids are assigned, unless RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1), so "CUDA when CUDA is visible" put
  every CPU trial of a GPU host on GPU 0, outside Ray's accounting. A trial with no GPU ids runs on the CPU; a
  trial with GPU ids runs on the first of them (its index among the visible devices: Ray sets
  CUDA_VISIBLE_DEVICES to the assigned ids, unless told not to, and then the id is the index).
- A trial given a fraction G < 1 of a GPU caps what torch's caching allocator may reserve in its process at G of
  that GPU's memory (``torch.cuda.set_per_process_memory_fraction``): one half-GPU trial cannot take the other's
  half. The CUDA context and libraries (some hundreds of MB a process) are outside the cap, so shares filled to
  the brim can still exhaust the card. The trial that needs more than its share (or than is left) gets a CUDA
  out-of-memory error, which ends it as
  "out of GPU memory (backbone, batch size)" (``OutOfGPUMemory``; search.outcome).
- Outside Ray the same rule with ``--device auto|cpu|cuda|cuda:N`` (auto: CUDA when there is a device, else Apple
  MPS, else the CPU).

``cuda_device_count`` is the one place that asks whether CUDA exists, so tests can fake a GPU host on a CPU.
Importing this module does not import Ray (the GPU bench runs in a stock PyTorch container).
"""
from __future__ import annotations

import os
import queue
import re
import sys
import threading
from typing import Iterator, Sequence

import numpy as np
import torch

from datasets.errors import UserError

DEVICE_HELP = "auto (a GPU when there is one, else the CPU), cpu, cuda or cuda:N"


class OutOfGPUMemory(UserError):
    """CUDA ran out of memory: the message names the backbone and batch size and what to change."""


def cuda_device_count() -> int:
    """CUDA devices this process sees (0 without CUDA). NVML's count: creates no CUDA context."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_device(request: str, option: str = "--device") -> str:
    if request not in ("auto", "cpu", "cuda", "mps") and not re.fullmatch(r"cuda:\d+", request or ""):
        raise UserError(f"{option} {request!r}: choose {DEVICE_HELP}")
    return request


def pick_device(request: str = "auto", assigned_gpus: Sequence | None = None) -> torch.device:
    """The device for ``request`` (auto | cpu | cuda | cuda:N | mps).

    ``assigned_gpus``: inside a Ray trial, the GPU ids Ray assigned to it (``ray_assignment()``); an empty list
    means the CPU whatever the host has. None: not under Ray, ``request`` decides.
    """
    check_device(request)
    if assigned_gpus is not None and request == "auto":
        if not assigned_gpus:
            return torch.device("cpu")
        if not cuda_device_count():  # a node declaring GPUs torch cannot use (or logical GPUs, as in the tests)
            print(f"warning: Ray assigned GPU(s) {list(assigned_gpus)} to this trial but torch sees no CUDA device "
                  f"here: training on the CPU (install a CUDA build of torch on that node, or search with "
                  f"--gpus-per-trial 0)", file=sys.stderr, flush=True)
            return torch.device("cpu")
        return torch.device("cuda", _visible_index(str(assigned_gpus[0])))
    if request == "auto":
        if cuda_device_count():
            return torch.device("cuda", 0)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if request.startswith("cuda"):
        n, index = cuda_device_count(), int(request.partition(":")[2] or 0)
        if index >= n:
            raise UserError(f"--device {request}: this machine has {n} CUDA device(s)"
                            + ("; use --device cpu" if not n else f"; use cuda:0..cuda:{n - 1}"))
        return torch.device("cuda", index)
    return torch.device(request)


def _visible_index(gpu_id: str) -> int:
    """Index, among the devices torch sees, of the physical GPU ``gpu_id`` Ray assigned."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:  # Ray told not to set it (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES): ids are indices
        return int(gpu_id)
    ids = [v.strip() for v in visible.split(",")]
    return ids.index(gpu_id) if gpu_id in ids else 0


def ray_assignment() -> tuple[list[str], float]:
    """(GPU ids, GPU amount) Ray assigned to this worker: call only inside a Ray trial (public Ray API)."""
    import ray

    ids = [str(i) for i in ray.get_gpu_ids()]
    return ids, float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))


def claim_device(device: torch.device, gpu_fraction: float = 1.0) -> torch.device:
    """Settings for running on ``device``: on CUDA cap this process at ``gpu_fraction`` of the card's memory
    (a fractional Ray trial) and let cuDNN pick the fastest kernels for the fixed input size."""
    if device.type == "cuda":
        if 0 < gpu_fraction < 1:
            torch.cuda.set_per_process_memory_fraction(float(gpu_fraction), device)
        torch.backends.cudnn.benchmark = True  # fixed-size inputs: benchmarked once per shape
    return device


def trial_device(request: str = "auto", in_ray_trial: bool = False) -> torch.device:
    """The device a training run uses, claimed (memory cap, cuDNN): Ray's assignment inside a trial."""
    if in_ray_trial:
        ids, amount = ray_assignment()
        return claim_device(pick_device("auto", ids), amount)
    return claim_device(pick_device(request))


def out_of_memory(cfg: dict, device, error: BaseException) -> OutOfGPUMemory:
    """The one-line error of a CUDA OOM: which backbone at which batch size, and what to change."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return OutOfGPUMemory(
        f"out of GPU memory ({cfg['backbone']}, batch size {cfg['batch_size']}) on {device}: give each trial more "
        f"of a GPU (--gpus-per-trial) or use a smaller batch size [{first[:200]}]")


# --- feeding a GPU ------------------------------------------------------------------------------

def _gather(arrays: Sequence[np.ndarray], idx: np.ndarray) -> list[torch.Tensor]:
    # Sorted rows: sequential reads from the memmap; order inside a batch is irrelevant.
    idx = np.sort(idx)
    return [torch.from_numpy(np.ascontiguousarray(a[idx])).pin_memory() for a in arrays]


def prefetch_to_cuda(arrays: Sequence[np.ndarray], batches: Sequence[np.ndarray], device: torch.device,
                     ahead: int = 2) -> Iterator[list[torch.Tensor]]:
    """Rows ``batches[i]`` of each array, on ``device``, batch after batch, while the GPU works on the last one.

    One background thread gathers the next batches from the memmap into pinned host memory (numpy's fancy
    indexing and the pinning copy release the GIL); their host-to-device copies are queued on a side CUDA
    stream, so the copy of batch i+1 runs while the model computes batch i. The compute stream waits for a
    batch's copy (an event) only when it uses it. ``ahead`` bounds the pinned batches waiting.
    """
    todo: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():  # the consumer may stop early (an error, a divergence): never block forever
            try:
                todo.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def producer():
        try:
            for idx in batches:
                if not put(_gather(arrays, idx)):
                    return
        except BaseException as e:  # re-raised in the consumer, with its own traceback
            put(e)

    thread = threading.Thread(target=producer, name="cuda-prefetch", daemon=True)
    thread.start()
    side = torch.cuda.Stream(device)

    def upload():
        item = todo.get()
        if isinstance(item, BaseException):
            raise item
        with torch.cuda.stream(side):
            tensors = [t.to(device, non_blocking=True) for t in item]
            ready = torch.cuda.Event()
            ready.record(side)
        return tensors, ready

    try:
        pending = upload() if len(batches) else None
        for i in range(len(batches)):
            tensors, ready = pending
            pending = upload() if i + 1 < len(batches) else None  # the next copy, queued before this compute
            compute = torch.cuda.current_stream(device)
            compute.wait_event(ready)
            for t in tensors:  # allocated on the side stream, used on the compute stream
                t.record_stream(compute)
            yield tensors
    finally:
        stop.set()
        thread.join(timeout=5)
