"""Batch augmentation on the training device, one knob: ``aug_strength`` in [0, 1].

Works on whole NCHW batches; every per-sample random choice is a vectorised index map or a
per-sample matrix, never a Python loop over samples or a PIL call. Two passes over the pixels:

1. geometry, as one gather of source pixels (on uint8, before float conversion): one of the 8
   dihedral views (flips, 90-degree rotations: histology has no orientation; any strength > 0),
   plus a small zoom (nearest pixel) and a whole-pixel shift with mirrored borders, both scaled by
   strength. Only the dihedral views keep the centre 32x32 px, which decides the PCam label, exactly; shift
   and zoom move pixels across its border both ways (tumour in, tumour out), so they are bounded to move it
   by at most LABEL_MARGIN = 3 px (docs/training.md has the measurement that chose this bound);
2. colour jitter - brightness, contrast, saturation and hue (a rotation about the grey axis) - all
   scaled by strength and folded into one per-sample 3x3 matrix + offset (one batched matmul).

The random draws and the per-sample parameters (source row and column of every output row and column,
the colour matrix) are made once, here, for both implementations of the pixel work: the torch one below
(any device; the reference) and trainables.augment_cpu's fused CPU kernel, so the two give the same
images for the same generator. The parameters are a few hundred numbers per batch: as numpy arithmetic
they take about 0.15 ms per batch of 64, as a few dozen tiny torch ops they took about 1 ms.

Why not grid_sample / HED stain jitter: on a CPU, bilinear resampling and the log/exp of HED
optical densities each cost more than the rest of the data path together (trainables.bench), and
these cheaper forms keep the same label-preserving variety. Strength 0 is the identity.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

# Maximal magnitudes at strength 1. Shift and zoom were 8 px and 15 % (a pixel up to 11 px outside the label's
# square could land inside it); on the real sample 2 px / 5 % measured at least as well (docs/training.md).
MAX_SHIFT = 2               # px
MAX_ZOOM = 0.05             # scale in [1/(1+z), 1+z]
MAX_BRIGHTNESS = 0.15
MAX_CONTRAST = 0.2
MAX_SATURATION = 0.2
MAX_HUE = 0.04              # fraction of a full hue turn
CENTRE = 32                 # the label's centre square, px
# The most a pixel of the label's square moves at strength 1: the shift, plus the zoom's reach at its edge.
LABEL_MARGIN = MAX_SHIFT + math.ceil(CENTRE / 2 * MAX_ZOOM)
_LUMA = (0.299, 0.587, 0.114)
_HUE_AXIS_CROSS = np.array([[0, -1, 1], [1, 0, -1], [-1, 1, 0]]) / math.sqrt(3)  # v -> axis x v


def _rand(shape, g, device) -> np.ndarray:
    """Uniform [0, 1) draws from the torch generator ``g`` (on ``device``), as float64 numpy."""
    return torch.rand(shape, generator=g, device=device).cpu().numpy().astype(np.float64)


def _uniform(shape, bound, g, device) -> np.ndarray:
    return (_rand(shape, g, device) * 2 - 1) * bound


def _np(values) -> np.ndarray:
    """float64 numpy of a draw (numpy, or a CPU tensor where a test substitutes its own draws)."""
    return np.asarray(values, dtype=np.float64)


@functools.lru_cache(maxsize=None)
def _mirror_table(size: int) -> np.ndarray:
    """Pixel index i in [-size, 2 size) at table[i + size], mirrored back inside (the edge pixel
    repeated: ...1 0 | 0 1...), as int32."""
    i = np.arange(-size, 2 * size)
    i = np.where(i < 0, -i - 1, i)
    return np.where(i >= size, 2 * size - 1 - i, i).astype(np.int32)


class Geometry(NamedTuple):
    """Per sample: the source row of every output row, the source column of every output column
    (each (n, size) int32) and whether the view is transposed ((n,) bool; output pixel (i, j) then
    shows source (rows[j], cols[i]) instead of (rows[i], cols[j]))."""
    rows: np.ndarray
    cols: np.ndarray
    transpose: np.ndarray

    @classmethod
    def identity(cls, n: int, size: int) -> "Geometry":
        grid = np.tile(np.arange(size, dtype=np.int32), (n, 1))
        return cls(grid, grid.copy(), np.zeros(n, dtype=bool))


class Colour(NamedTuple):
    """Per sample: x -> matrix @ x + offset * m0 (1, 1, 1), m0 the image's mean grey (luma) in input
    units, measured after the geometry; matrix (n, 3, 3), offset (n,), both float32."""
    matrix: np.ndarray
    offset: np.ndarray

    @classmethod
    def identity(cls, n: int, scale: float = 1.0) -> "Colour":
        return cls(np.tile(np.eye(3, dtype=np.float32) * np.float32(scale), (n, 1, 1)), np.zeros(n, np.float32))


def geometry_params(n: int, size: int, strength: float, g=None, device="cpu",
                    k: torch.Tensor | None = None) -> Geometry:
    """Dihedral view, zoom and shift of ``n`` square images of side ``size``.

    ``k`` (0..7) fixes the dihedral view per sample (random when None); strength 0 with k given
    is the pure dihedral view. Bits of k: 1 = transpose, 2 = flip left-right, 4 = flip up-down;
    these 8 combinations are exactly the symmetries of the square.
    """
    if k is None:
        k = torch.randint(0, 8, (n,), generator=g, device=device)
    k = k.cpu().numpy()
    if strength > 0:
        z = MAX_ZOOM * strength
        scale = np.exp((_rand(n, g, device) * 2 - 1) * math.log1p(z))
        # Keep the centre square in view: the output spans 'size * scale' source pixels around
        # 'centre + shift', so |shift| <= (size * scale - CENTRE) / 2 keeps all CENTRE px inside.
        limit = np.clip(np.floor((size * scale - CENTRE) / 2), 0, round(MAX_SHIFT * strength))[:, None]
        shift = np.clip(np.round(_np(_uniform((n, 2), 1, g, device)) * (limit + 0.5)), -limit, limit)
    else:
        scale, shift = np.ones(n), np.zeros((n, 2))
    # Both axes at once, (n, 2, size): source row of every output row, source column of every output
    # column; bit 4 of k flips the rows (up-down), bit 2 the columns (left-right).
    c = np.arange(size) - (size - 1) / 2
    signed_scale = np.where((k[:, None] & np.array([4, 2])) > 0, -scale[:, None], scale[:, None])
    src = np.floor(c * signed_scale[:, :, None] + (shift + (size - 1) / 2 + 0.5)[:, :, None]).astype(np.intp)
    src = _mirror_table(size)[src + size]       # zoom and shift reach at most ~size/5 past an edge
    return Geometry(np.ascontiguousarray(src[:, 0]), np.ascontiguousarray(src[:, 1]), (k & 1) > 0)


def geometry_index(n: int, size: int, strength: float, g=None, device="cpu",
                   k: torch.Tensor | None = None) -> torch.Tensor:
    """(n, size*size) source pixel index of every output pixel (see geometry_params)."""
    return flat_index(geometry_params(n, size, strength, g, device, k), device)


def flat_index(geo: Geometry, device) -> torch.Tensor:
    n, size = geo.rows.shape
    rows = torch.from_numpy(geo.rows.astype(np.int64) * size).to(device)
    cols = torch.from_numpy(geo.cols.astype(np.int64)).to(device)
    # index(i, j) = rows[i] + cols[j]; transposed: rows[j] + cols[i]. Swap the two small terms
    # instead of transposing the big map.
    t = torch.from_numpy(geo.transpose).to(device)[:, None]
    along_i, along_j = torch.where(t, cols, rows), torch.where(t, rows, cols)
    return (along_i[:, :, None] + along_j[:, None, :]).view(n, size * size)


def colour_params(n: int, strength: float, g=None, device="cpu", scale: float = 1.0) -> Colour:
    """Brightness, contrast, saturation, hue as x -> A x + t with t = offset * m0 (1, 1, 1).

    brightness x*(1+b); contrast c*(x - m) + m around the mean grey m; saturation s*(x - grey) +
    grey; hue: rotation about the grey axis (Rodrigues). Saturation and hue leave grey vectors
    unchanged, so the composition is A = R_hue S_sat c(1+b), t = (1-c)(1+b) m0 (1,1,1).
    ``scale`` multiplies the input first, inside A and t (1/255: 0..255 values in, [0, 1] out).
    """
    b = 1 + _np(_uniform(n, MAX_BRIGHTNESS * strength, g, device))
    c = 1 + _np(_uniform(n, MAX_CONTRAST * strength, g, device))
    s = 1 + _np(_uniform(n, MAX_SATURATION * strength, g, device))
    h_angle = _np(_uniform(n, MAX_HUE * strength * 2 * math.pi, g, device))
    eye, kx = np.eye(3), _HUE_AXIS_CROSS
    sat = s[:, None, None] * eye + (1 - s)[:, None, None] * np.array(_LUMA)[None, None, :]   # rows: s*e_i + (1-s)*luma
    rot = eye + np.sin(h_angle)[:, None, None] * kx + (1 - np.cos(h_angle))[:, None, None] * (kx @ kx)
    a = rot @ sat * (c * b * scale)[:, None, None]
    return Colour(a.astype(np.float32), ((1 - c) * b * scale).astype(np.float32))


def gather_pixels(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Apply per-sample pixel index maps (n, H*W) to an NCHW batch of any dtype."""
    n, ch, h, w = x.shape
    return torch.gather(x.reshape(n, ch, h * w), 2, idx[:, None, :].expand(n, ch, h * w)).view(n, ch, h, w)


def dihedral(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Dihedral view ``k`` (0..7) per sample of square NCHW images; exact (a pixel permutation)."""
    return gather_pixels(x, geometry_index(x.shape[0], x.shape[-1], 0.0, device=x.device, k=k))


def dihedral_view(x: torch.Tensor, k: int) -> torch.Tensor:
    """The same view ``k`` for a whole batch, as flips and a transpose (views, no index map).

    Equal to ``dihedral(x, k)`` for every sample: bit 4 flips up-down, bit 2 left-right, bit 1
    transposes the result.
    """
    if k & 4:
        x = x.flip(-2)
    if k & 2:
        x = x.flip(-1)
    return x.transpose(-1, -2) if k & 1 else x


def draw_device(g: torch.Generator | None) -> torch.device:
    """Where the random draws are made: on the generator's device (the CPU for none)."""
    return g.device if g is not None else torch.device("cpu")


def random_geometry(x: torch.Tensor, strength: float, g=None) -> torch.Tensor:
    geo = geometry_params(x.shape[0], x.shape[-1], strength, g, draw_device(g))
    return gather_pixels(x, flat_index(geo, x.device))


def mean_grey(x: torch.Tensor) -> torch.Tensor:
    """(n,) mean luma of an NCHW batch, from every 4th pixel of every 4th row: 16x cheaper than all
    of them, the same to ~1e-3 (it only centres the contrast change)."""
    luma = torch.tensor(_LUMA, device=x.device)
    return x[:, :, ::4, ::4].mean((2, 3), dtype=torch.float32) @ luma


def apply_colour(x: torch.Tensor, colour: Colour) -> torch.Tensor:
    """x -> A x + offset * m0 on a float NCHW batch, as one batched matmul in x's dtype."""
    n, ch, h, w = x.shape
    a = torch.from_numpy(colour.matrix).to(x.device)
    t = (torch.from_numpy(colour.offset).to(x.device) * mean_grey(x))[:, None, None].expand(n, 3, 1)
    return torch.baddbmm(t.to(x.dtype), a.to(x.dtype), x.reshape(n, ch, h * w)).view(n, ch, h, w)


def colour_jitter(x: torch.Tensor, strength: float, g=None, scale: float = 1.0) -> torch.Tensor:
    """Colour jitter (colour_params) of a float NCHW batch; ``scale`` as there."""
    return apply_colour(x, colour_params(x.shape[0], strength, g, draw_device(g), scale))


def check_strength(strength: float) -> None:
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"aug_strength must be in [0, 1], got {strength}")


def augment_batch(x: torch.Tensor, strength: float, g: torch.Generator | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Augment an NCHW batch (uint8 0..255 or float in [0, 1]); returns float in [0, 1].

    Strength 0 is the identity (a float input comes back unchanged), 1 the strongest. The
    geometry runs before the float conversion when given uint8: 4x fewer bytes to move; the
    division by 255 rides in the colour matrix. ``dtype``: what a uint8 batch becomes; bf16 for a
    model that runs in bf16 (it would round its input to bf16 anyway) halves the bytes of the colour
    pass (the random draws and matrices stay fp32 until the one batched matmul).
    """
    check_strength(strength)
    if strength > 0:
        x = random_geometry(x, strength, g)
    scale = 1.0
    if x.dtype == torch.uint8:
        x, scale = x.to(dtype), 1 / 255
    if strength == 0:
        return x.div_(255) if scale != 1.0 else x
    return colour_jitter(x, strength, g, scale).clamp_(0.0, 1.0)


def augment_nhwc(x: torch.Tensor, strength: float, g: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 normalise: tuple[Sequence[float], Sequence[float]] | None = None) -> torch.Tensor:
    """A uint8 NHWC batch (the memmap's rows) to the model's input, as torch ops on any device:
    augment_batch at ``strength`` (0: none), then ``normalise`` = (mean, std) per channel when given,
    in ``dtype`` and, with ``channels_last``, in that memory layout. trainables.augment_cpu.augment_nhwc
    is the same function for CPUs, in one fused pass."""
    # With a normalisation, compute in fp32 and round to ``dtype`` once, as the CPU kernel does.
    x = augment_batch(x.permute(0, 3, 1, 2).contiguous(), strength, g,
                      torch.float32 if normalise is not None else dtype)
    if normalise is not None:
        mean, std = (torch.tensor(v, device=x.device, dtype=torch.float32).view(1, 3, 1, 1) for v in normalise)
        x = x.sub_(mean).div_(std).to(dtype)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
