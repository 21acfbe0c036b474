"""augment_batch on a CPU as one compiled loop: uint8 NHWC memmap rows in, the model's input out.

trainables.augment does the pixel work as torch ops: a permute, a gather with an (n, H*W) int64 index
map, a float conversion, a batched 3x3 matmul, a clamp and a cast, each a pass over the batch into a
freshly allocated tensor; the normalisation (in the model) and the channels_last copy (FastPath) are two
more. On a 2-core CPU that was about 5 ms per batch of 64. Here a numba kernel does it per sample while
the sample is in cache: colour (the per-sample 3x3 matrix, the clamp and the normalisation folded into
one affine map) over the source pixels in memory order, then the geometry as a gather of those values
into the output, written straight in the model's dtype (fp32, or bf16 rounded as torch rounds) and
layout (NCHW or channels_last), so nothing after it converts or copies the batch again.

The draws and parameters are trainables.augment's: the same generator gives the same images as
augment_batch, to fp32 rounding (tests/test_trainables_augment_cpu.py). The batch is split across
``torch.get_num_threads()`` threads; the kernel releases the GIL. Python threads rather than numba's
parallel layers: its OpenMP layer cannot run in a forked child and its fallback layer is not thread-safe.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from numba import njit

from trainables.augment import (_LUMA, Colour, Geometry, check_strength, colour_params, draw_device,
                                geometry_params)

_L0, _L1, _L2 = (np.float32(v) for v in _LUMA)
# Fast-math flags that cannot change a result for finite inputs (no NaN/inf here; the sign of a zero
# does not matter): they let min/max vectorise. Not 'contract' or 'reassoc': with those the rounding
# depends on what LLVM fused or reordered, which differs between a fresh compile and the cached one
# (a resumed trial would draw different pixels than the run it resumes).
_EXACT_FAST = {"nnan", "ninf", "nsz"}


@njit(nogil=True, cache=True, fastmath=_EXACT_FAST)
def _fused(x, rows, cols, transpose, a, offset, norm, lo, hi, start, stop, out, nhwc, bf16):
    """Samples [start, stop) of ``x`` ((n, S*S*3) uint8 RGB rows) into ``out``.

    ``out``: C-contiguous (n, 3, S, S), or (n, S, S, 3) when ``nhwc`` (the memory of a channels_last
    tensor); float32, or with ``bf16`` int16 holding bf16 bit patterns, rounded to nearest even as torch
    rounds (the values are finite; the int16 store keeps the low 16 bits, sign included). Per sample, two
    loops: the colour map over the source pixels in memory order (contiguous: it vectorises) into three
    float planes, then the geometry as a gather from the planes (colour is per pixel, so the order of the
    two does not matter; only the contrast centre m0 is measured on the output grid, as augment_batch
    measures it).
    """
    size = rows.shape[1]
    ai, aj = np.empty(size, np.int32), np.empty(size, np.int32)
    planes = np.empty((3, size * size), np.float32)
    for s in range(start, stop):
        _source_offsets(rows, cols, transpose, s, ai, aj)
        _colour_planes(x[s], a[s], offset[s] * _mean_grey(x[s], ai, aj), norm, lo, hi, planes)
        if bf16:
            bits = planes.view(np.uint32)
            for c in range(3):
                for p in range(size * size):
                    b = bits[c, p]
                    bits[c, p] = (b + np.uint32(0x7FFF) + ((b >> 16) & np.uint32(1))) >> 16
            _gather(bits, ai, aj, s, out, nhwc)
        else:
            _gather(planes, ai, aj, s, out, nhwc)


@njit(nogil=True, cache=True)
def _source_offsets(rows, cols, transpose, s, ai, aj):
    """Source pixel of output pixel (i, j) = ai[i] + aj[j] (a pixel number, row-major)."""
    size = rows.shape[1]
    for i in range(size):
        if transpose[s]:
            ai[i], aj[i] = cols[s, i], rows[s, i] * size
        else:
            ai[i], aj[i] = rows[s, i] * size, cols[s, i]


@njit(nogil=True, cache=True, fastmath=_EXACT_FAST)
def _mean_grey(xs, ai, aj):
    """Mean luma of every 4th pixel of every 4th output row (augment.mean_grey), in 0..255 units."""
    size = ai.shape[0]
    acc = np.float32(0.0)
    for i in range(0, size, 4):
        for j in range(0, size, 4):
            o = 3 * (ai[i] + aj[j])
            acc += _L0 * xs[o] + _L1 * xs[o + 1] + _L2 * xs[o + 2]
    return acc / np.float32(((size + 3) // 4) ** 2)


@njit(nogil=True, cache=True, fastmath=_EXACT_FAST)
def _colour_planes(xs, a, t, norm, lo, hi, planes):
    """planes[c, p] = clamp((a[c] . x_p + t - mean_c) / std_c, lo_c, hi_c) for every source pixel p."""
    i0, i1, i2 = np.float32(1.0) / norm[1, 0], np.float32(1.0) / norm[1, 1], np.float32(1.0) / norm[1, 2]
    a00, a01, a02, t0 = a[0, 0] * i0, a[0, 1] * i0, a[0, 2] * i0, (t - norm[0, 0]) * i0
    a10, a11, a12, t1 = a[1, 0] * i1, a[1, 1] * i1, a[1, 2] * i1, (t - norm[0, 1]) * i1
    a20, a21, a22, t2 = a[2, 0] * i2, a[2, 1] * i2, a[2, 2] * i2, (t - norm[0, 2]) * i2
    lo0, lo1, lo2, hi0, hi1, hi2 = lo[0], lo[1], lo[2], hi[0], hi[1], hi[2]
    for p in range(planes.shape[1]):
        p0, p1, p2 = np.float32(xs[3 * p]), np.float32(xs[3 * p + 1]), np.float32(xs[3 * p + 2])
        planes[0, p] = min(max(a00 * p0 + a01 * p1 + a02 * p2 + t0, lo0), hi0)
        planes[1, p] = min(max(a10 * p0 + a11 * p1 + a12 * p2 + t1, lo1), hi1)
        planes[2, p] = min(max(a20 * p0 + a21 * p1 + a22 * p2 + t2, lo2), hi2)


@njit(nogil=True, cache=True)
def _gather(planes, ai, aj, s, out, nhwc):
    size = ai.shape[0]
    if nhwc:
        for i in range(size):
            for j in range(size):
                q = ai[i] + aj[j]
                out[s, i, j, 0] = planes[0, q]
                out[s, i, j, 1] = planes[1, q]
                out[s, i, j, 2] = planes[2, q]
    else:
        for c in range(3):
            for i in range(size):
                for j in range(size):
                    out[s, c, i, j] = planes[c, ai[i] + aj[j]]


_pool_lock = threading.Lock()
_pool: tuple[int, int, ThreadPoolExecutor] | None = None


def _executor(workers: int) -> ThreadPoolExecutor:
    """This process's pool, of at least ``workers`` threads: it grows, never shrinks (a small batch
    just submits fewer jobs), and a forked child, whose copy of the pool has no threads, makes its own."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid() or _pool[1] < workers:
            # A pool being replaced finishes the jobs it has (another thread's batch), then its threads exit.
            if _pool is not None and _pool[0] == os.getpid():
                _pool[2].shutdown(wait=False)
            _pool = (os.getpid(), workers, ThreadPoolExecutor(workers, thread_name_prefix="augment"))
        return _pool[2]


def augment_nhwc(x: torch.Tensor, strength: float, g: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 normalise: tuple[Sequence[float], Sequence[float]] | None = None) -> torch.Tensor:
    """trainables.augment.augment_nhwc for a uint8 NHWC batch on the CPU, in one pass: augment_batch at
    ``strength`` (0: none) then ``normalise`` = (mean, std) when given, as (n, 3, H, W) of ``dtype``
    (float32 or bfloat16), channels_last in memory when asked, else contiguous NCHW."""
    check_strength(strength)
    n, h, w, ch = x.shape
    if x.dtype != torch.uint8 or x.device.type != "cpu" or h != w or ch != 3:
        raise ValueError(f"augment_nhwc takes square uint8 RGB NHWC CPU batches, got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"augment_nhwc writes float32 or bfloat16, not {dtype}")
    # augment_batch's draws, in its order (geometry, then colour); none at strength 0.
    if strength > 0:
        draw = draw_device(g)
        geo, colour = geometry_params(n, h, strength, g, draw), colour_params(n, strength, g, draw, 1 / 255)
    else:
        geo, colour = Geometry.identity(n, h), Colour.identity(n, 1 / 255)
    norm = np.array(normalise if normalise is not None else ((0, 0, 0), (1, 1, 1)), np.float32)
    if norm.shape != (2, 3) or not (norm[1] > 0).all():   # the kernel does no bounds checks
        raise ValueError(f"normalise must be (mean, std) of 3 values each with std > 0, got {normalise}")
    lo, hi = -norm[0] / norm[1], (1 - norm[0]) / norm[1]    # [0, 1] after normalisation
    out = torch.empty((n, h, w, 3) if channels_last else (n, 3, h, w), dtype=dtype)
    bf16 = dtype == torch.bfloat16
    args = (np.ascontiguousarray(x.numpy()).reshape(n, h * w * 3), geo.rows, geo.cols, geo.transpose,
            colour.matrix, colour.offset, norm, lo, hi)
    tail = ((out.view(torch.int16) if bf16 else out).numpy(), channels_last, bf16)
    workers = max(1, min(torch.get_num_threads(), n))
    bounds = [n * i // workers for i in range(workers + 1)]
    pool = _executor(workers - 1) if workers > 1 else None
    jobs = [pool.submit(_fused, *args, bounds[i], bounds[i + 1], *tail) for i in range(workers - 1)]
    try:
        _fused(*args, bounds[-2], bounds[-1], *tail)
    finally:
        for job in jobs:
            job.result()
    return out.permute(0, 3, 1, 2) if channels_last else out
