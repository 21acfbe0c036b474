"""Batch augmentation on the training device, one knob: ``aug_strength`` in [0, 1].

Works on whole NCHW batches; every per-sample random choice is a vectorised index map or a
per-sample matrix, never a Python loop over samples or a PIL call. Two passes over the pixels:

1. geometry, as one gather of source pixels (on uint8, before float conversion): one of the 8
   dihedral views (flips, 90-degree rotations: histology has no orientation; any strength > 0),
   plus a small zoom (nearest pixel) and a whole-pixel shift with mirrored borders, both scaled by
   strength and bounded so the centre 32x32 px, which decides the PCam label, always stays in view;
2. colour jitter - brightness, contrast, saturation and hue (a rotation about the grey axis) - all
   scaled by strength and folded into one per-sample 3x3 matrix + offset (one batched matmul).

Why not grid_sample / HED stain jitter: on a CPU, bilinear resampling and the log/exp of HED
optical densities each cost more than the rest of the data path together (trainables.bench), and
these cheaper forms keep the same label-preserving variety. Strength 0 is the identity.
"""
from __future__ import annotations

import math

import torch

# Maximal magnitudes at strength 1.
MAX_SHIFT = 8               # px
MAX_ZOOM = 0.15             # scale in [1/(1+z), 1+z]
MAX_BRIGHTNESS = 0.15
MAX_CONTRAST = 0.2
MAX_SATURATION = 0.2
MAX_HUE = 0.04              # fraction of a full hue turn
CENTRE = 32                 # the label's centre square, px
_LUMA = (0.299, 0.587, 0.114)


def _uniform(shape, bound, g, device) -> torch.Tensor:
    return (torch.rand(shape, generator=g, device=device) * 2 - 1) * bound


def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    """Mirror out-of-range pixel indices back inside (edge pixel repeated: ...1 0 | 0 1...)."""
    i = torch.where(i < 0, -i - 1, i)
    return torch.where(i >= size, 2 * size - 1 - i, i)


def geometry_index(n: int, size: int, strength: float, g=None, device="cpu",
                   k: torch.Tensor | None = None) -> torch.Tensor:
    """(n, size*size) source pixel index of every output pixel: dihedral view, zoom and shift.

    ``k`` (0..7) fixes the dihedral view per sample (random when None); strength 0 with k given
    is the pure dihedral view. Bits of k: 1 = transpose, 2 = flip left-right, 4 = flip up-down;
    these 8 combinations are exactly the symmetries of the square.
    """
    if k is None:
        k = torch.randint(0, 8, (n,), generator=g, device=device)
    z = MAX_ZOOM * strength
    scale = (torch.rand(n, generator=g, device=device) * 2 - 1).mul(math.log1p(z)).exp()
    # Keep the centre square in view: the output spans 'size * scale' source pixels around
    # 'centre + shift', so |shift| <= (size * scale - CENTRE) / 2 keeps all CENTRE px inside.
    limit = ((size * scale - CENTRE) / 2).floor().clamp(min=0, max=round(MAX_SHIFT * strength))
    shift = (_uniform((n, 2), 1, g, device) * (limit[:, None] + 0.5)).round().clamp(-limit[:, None], limit[:, None])
    c = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    mid = (size - 1) / 2

    def axis(bit: int, col: int) -> torch.Tensor:   # (n, size) source row/column per output one
        coord = torch.where(((k & bit) > 0)[:, None], -c, c)
        src = torch.floor(coord * scale[:, None] + mid + shift[:, col:col + 1] + 0.5).long()
        return _reflect(src, size)
    rows, cols = axis(4, 0) * size, axis(2, 1)
    # index(i, j) = rows[i] + cols[j]; transposed: rows[j] + cols[i]. Swap the two small terms
    # instead of transposing the big map.
    t = ((k & 1) > 0)[:, None]
    along_i, along_j = torch.where(t, cols, rows), torch.where(t, rows, cols)
    return (along_i[:, :, None] + along_j[:, None, :]).view(n, size * size)


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


def random_geometry(x: torch.Tensor, strength: float, g=None) -> torch.Tensor:
    return gather_pixels(x, geometry_index(x.shape[0], x.shape[-1], strength, g, x.device))


def colour_jitter(x: torch.Tensor, strength: float, g=None, scale: float = 1.0) -> torch.Tensor:
    """Brightness, contrast, saturation, hue on a float NCHW batch in [0, 1], as x -> A x + t.

    brightness x*(1+b); contrast c*(x - m) + m around the mean grey m; saturation s*(x - grey) +
    grey; hue: rotation about the grey axis (Rodrigues). Saturation and hue leave grey vectors
    unchanged, so the composition is A = R_hue S_sat c(1+b), t = (1-c)(1+b) m0 (1,1,1).
    ``scale`` multiplies the input first, inside A (1/255: 0..255 values in, [0, 1] out, one pass fewer).
    """
    n, ch, h, w = x.shape
    # The per-sample matrices are made in fp32 whatever x holds (fp32, or bf16 for a bf16 model).
    dev, dt = x.device, torch.float32
    b = 1 + _uniform(n, MAX_BRIGHTNESS * strength, g, dev)
    c = 1 + _uniform(n, MAX_CONTRAST * strength, g, dev)
    s = 1 + _uniform(n, MAX_SATURATION * strength, g, dev)
    h_angle = _uniform(n, MAX_HUE * strength * 2 * math.pi, g, dev)
    luma = torch.tensor(_LUMA, device=dev, dtype=dt)
    eye = torch.eye(3, device=dev, dtype=dt)
    sat = s[:, None, None] * eye + (1 - s)[:, None, None] * luma[None, None, :]   # rows: s*e_i + (1-s)*luma
    kx = torch.tensor([[0, -1, 1], [1, 0, -1], [-1, 1, 0]], device=dev, dtype=dt) / math.sqrt(3)
    cos, sin = h_angle.cos()[:, None, None], h_angle.sin()[:, None, None]
    rot = eye + sin * kx + (1 - cos) * (kx @ kx)
    a = rot @ sat * (c * b * scale)[:, None, None]
    # mean grey (contrast centre) from every 4th pixel: 16x cheaper, the same to ~1e-3
    m0 = x[:, :, ::4, ::4].mean((2, 3), dtype=dt) @ luma * scale
    t = ((1 - c) * b * m0)[:, None, None].expand(n, 3, 1)
    return torch.baddbmm(t.to(x.dtype), a.to(x.dtype), x.reshape(n, ch, h * w)).view(n, ch, h, w)


def augment_batch(x: torch.Tensor, strength: float, g: torch.Generator | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Augment an NCHW batch (uint8 0..255 or float in [0, 1]); returns float in [0, 1].

    Strength 0 is the identity (a float input comes back unchanged), 1 the strongest. The
    geometry runs before the float conversion when given uint8: 4x fewer bytes to move; the
    division by 255 rides in the colour matrix. ``dtype``: what a uint8 batch becomes; bf16 for a
    model that runs in bf16 (it would round its input to bf16 anyway) halves the bytes of the colour
    pass (the random draws and matrices stay fp32 until the one batched matmul).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"aug_strength must be in [0, 1], got {strength}")
    if strength > 0:
        x = random_geometry(x, strength, g)
    scale = 1.0
    if x.dtype == torch.uint8:
        x, scale = x.to(dtype), 1 / 255
    if strength == 0:
        return x.div_(255) if scale != 1.0 else x
    return colour_jitter(x, strength, g, scale).clamp_(0.0, 1.0)
