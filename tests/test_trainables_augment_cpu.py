"""The fused CPU data path (trainables.augment_cpu) is trainables.augment's augmentation, in one pass."""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainables import augment, augment_cpu

REPO = Path(__file__).resolve().parents[1]
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _u8(n=12, size=96, seed=0):
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _both(x, strength, seed=1, **kw):
    fused = augment_cpu.augment_nhwc(x, strength, torch.Generator().manual_seed(seed), **kw)
    ref = augment.augment_nhwc(x, strength, torch.Generator().manual_seed(seed), **kw)
    return fused, ref


@pytest.mark.parametrize("strength", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("normalise", [None, IMAGENET])
def test_same_draws_give_the_same_images_as_the_torch_ops(strength, channels_last, normalise):
    x = _u8()
    fused, ref = _both(x, strength, channels_last=channels_last, normalise=normalise)
    assert fused.shape == ref.shape == (12, 3, 96, 96) and fused.dtype == torch.float32
    torch.testing.assert_close(fused, ref, atol=2e-6, rtol=2e-6)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert fused.is_contiguous(memory_format=fmt)
    if strength > 0:
        assert not torch.allclose(fused, augment.augment_nhwc(x, 0.0, normalise=normalise))  # it did augment


def test_the_torch_path_in_bf16_rounds_the_same_fp32_result_once():
    """What a GPU gets (the torch ops) in bf16: the kernel's bf16 batch, up to the last bit of fp32 rounding."""
    x = _u8(6)
    fused, ref = _both(x, 0.7, dtype=torch.bfloat16, channels_last=True, normalise=IMAGENET)
    assert ref.dtype == fused.dtype == torch.bfloat16
    ulp = torch.finfo(torch.bfloat16).eps * fused.float().abs().clamp(min=1e-2)
    assert ((fused.float() - ref.float()).abs() <= ulp).all()
    assert (fused == ref).float().mean() > 0.99


def test_bf16_is_the_fp32_result_rounded_as_torch_rounds():
    x = _u8(7)
    for channels_last in (False, True):
        for normalise in (None, IMAGENET):
            kw = dict(channels_last=channels_last, normalise=normalise)
            b = augment_cpu.augment_nhwc(x, 0.8, torch.Generator().manual_seed(5), torch.bfloat16, **kw)
            f = augment_cpu.augment_nhwc(x, 0.8, torch.Generator().manual_seed(5), torch.float32, **kw)
            assert b.dtype == torch.bfloat16 and torch.equal(b, f.to(torch.bfloat16))


def test_values_are_clamped_before_normalisation():
    x = torch.zeros(16, 96, 96, 3, dtype=torch.uint8)
    x[:, :, :48] = 255   # half white, half black: more contrast or brightness pushes past [0, 1]
    plain = augment_cpu.augment_nhwc(x, 1.0, torch.Generator().manual_seed(0))
    assert plain.min() == 0 and plain.max() == 1 and (plain == 1).float().mean() > 0.1
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET)
    normed = augment_cpu.augment_nhwc(x, 1.0, torch.Generator().manual_seed(0), normalise=IMAGENET)
    torch.testing.assert_close(normed, (plain - mean) / std)


def test_result_does_not_depend_on_the_thread_count():
    x, threads = _u8(9), torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(augment_cpu.augment_nhwc(x, 0.6, torch.Generator().manual_seed(2), torch.bfloat16, True))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="uint8 RGB NHWC"):
        augment_cpu.augment_nhwc(torch.rand(2, 96, 96, 3), 0.5)
    with pytest.raises(ValueError, match="uint8 RGB NHWC"):
        augment_cpu.augment_nhwc(_u8(2).permute(0, 3, 1, 2), 0.5)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        augment_cpu.augment_nhwc(_u8(2), 0.5, dtype=torch.float16)
    with pytest.raises(ValueError, match="aug_strength"):
        augment_cpu.augment_nhwc(_u8(2), 1.5)
    with pytest.raises(ValueError, match="normalise"):
        augment_cpu.augment_nhwc(_u8(2), 0.5, normalise=((0.5,), (0.2,)))
    with pytest.raises(ValueError, match="normalise"):
        augment_cpu.augment_nhwc(_u8(2), 0.5, normalise=((0.5,) * 3, (0.2, 0.0, 0.2)))


def _in_child(queue):
    torch.set_num_threads(2)
    queue.put(augment_cpu.augment_nhwc(_u8(6), 0.5, torch.Generator().manual_seed(4)).numpy())


def test_a_forked_child_gets_its_own_threads():
    """The parent's worker threads do not exist in a fork: the child must not wait on them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        here = augment_cpu.augment_nhwc(_u8(6), 0.5, torch.Generator().manual_seed(4))  # the pool exists now
    finally:
        torch.set_num_threads(threads)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_in_child, args=(queue,))
    child.start()
    try:
        got = queue.get(timeout=120)
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
    np.testing.assert_array_equal(got, here.numpy())


_PRINT_PIXELS = """
import json, torch
from trainables.augment_cpu import augment_nhwc
x = torch.randint(0, 256, (5, 96, 96, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
y = augment_nhwc(x, 0.9, torch.Generator().manual_seed(1), torch.bfloat16, True, ((0.5,) * 3, (0.25,) * 3))
from trainables.augment_cpu import _fused
print(json.dumps({"pixels": y.float().flatten().tolist(), "cache_hits": sum(_fused.stats.cache_hits.values())}))
"""


def test_a_fresh_compile_and_the_cached_kernel_give_the_same_pixels(tmp_path):
    """A resumed trial must draw the same batches as the run it resumes, though one process compiled the
    kernel and the other loaded it from numba's cache (fast-math contraction would break this)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", _PRINT_PIXELS], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr
    cold, cached = (json.loads(r.stdout) for r in runs)
    assert cold["cache_hits"] == 0 and cached["cache_hits"] > 0   # compiled, then loaded from the cache
    cold, cached = cold["pixels"], cached["pixels"]
    assert cold == cached
    x = torch.randint(0, 256, (5, 96, 96, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    here = augment_cpu.augment_nhwc(x, 0.9, torch.Generator().manual_seed(1), torch.bfloat16, True,
                                    ((0.5,) * 3, (0.25,) * 3))
    assert here.float().flatten().tolist() == cold


def test_the_model_sees_the_same_input_whether_it_or_the_data_path_normalises():
    from trainables.models import build_model
    from trainables.train import resolve_config, to_input
    model = build_model("baseline_bn", pretrained=False).eval()
    cfg = resolve_config({"backbone": "baseline_bn", "aug_strength": 0.5})
    x = _u8(4)
    with torch.no_grad():
        own = model(to_input(x, cfg, aug=True, g=torch.Generator().manual_seed(0)))
        folded = model(to_input(x, cfg, aug=True, g=torch.Generator().manual_seed(0),
                                normalise=model.input_normalization()), normalised=True)
    torch.testing.assert_close(folded, own, atol=1e-4, rtol=1e-4)
