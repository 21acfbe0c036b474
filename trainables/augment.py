"""Batch augmentation on the training device, one knob: ``aug_strength`` in [0, 1].

Works on whole float batches (N, 3, H, W) in [0, 1]; every per-sample random choice is a
vectorised mask or a per-sample matrix, never a Python loop over samples or a PIL call.

- the 8 dihedral views (flips and 90-degree rotations): histology has no canonical orientation,
  so any strength > 0 draws one of the 8 uniformly per image;
- a small random zoom/translation (affine_grid + grid_sample, reflection padding) bounded so the
  centre 32x32 px, which decides the PCam label, always stays in view;
- stain/colour jitter: HED stain perturbation (Tellez et al. 2018) plus brightness, contrast,
  saturation and hue, all scaled by strength.

Strength 0 returns the input unchanged (the identity, bit for bit).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Maximal magnitudes at strength 1.
MAX_SHIFT = 8 / 48          # translation, in normalised coords (8 px on a 96 px patch)
MAX_ZOOM = 0.15             # scale in [1/(1+z), 1+z]
MAX_HED = 0.05              # HED stain alpha/beta sigma
MAX_BRIGHTNESS = 0.15
MAX_CONTRAST = 0.2
MAX_SATURATION = 0.2
MAX_HUE = 0.04              # fraction of a full hue turn
CENTRE_HALF = 1 / 3         # the centre 32x32 of 96 px spans [-1/3, 1/3] in normalised coords

# RGB <-> HED stain matrix (Ruifrok & Johnston; as in skimage.color.rgb2hed).
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_RGB_FROM_HED[2] = torch.linalg.cross(_RGB_FROM_HED[0], _RGB_FROM_HED[1])
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_LUMA = torch.tensor([0.299, 0.587, 0.114])


def _uniform(n: int, low: float, high: float, g: torch.Generator | None, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (high - low) + low


def dihedral(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Apply dihedral element ``k`` (0..7) per sample to square images (N, C, H, H).

    Bits of k: 1 = transpose, 2 = flip left-right, 4 = flip up-down; these 8 combinations are
    exactly the 8 symmetries of the square. k=0 is the identity.
    """
    def where(bit, y):
        return torch.where(((k & bit) > 0).view(-1, 1, 1, 1), y, x)
    x = where(1, x.transpose(-1, -2))
    x = where(2, x.flip(-1))
    x = where(4, x.flip(-2))
    return x


def random_dihedral(x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
    k = torch.randint(0, 8, (x.shape[0],), generator=g, device=x.device)
    return dihedral(x, k)


def affine_params(n: int, strength: float, g: torch.Generator | None = None, device="cpu"):
    """Per-sample (scale, shift_xy): output coord u samples input at ``scale * u + shift``.

    Bounds guarantee |shift| + 1/3 <= scale on both axes, i.e. the input's centre 32x32 maps
    inside the output frame.
    """
    z = MAX_ZOOM * strength
    log_s = _uniform(n, -math.log1p(z), math.log1p(z), g, device)
    scale = log_s.exp()
    limit = torch.clamp(scale - CENTRE_HALF, min=0).clamp(max=MAX_SHIFT * strength)
    shift = (torch.rand(n, 2, generator=g, device=device) * 2 - 1) * limit[:, None]
    return scale, shift


def random_affine(x: torch.Tensor, strength: float, g: torch.Generator | None = None) -> torch.Tensor:
    n = x.shape[0]
    scale, shift = affine_params(n, strength, g, x.device)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def hed_jitter(x: torch.Tensor, strength: float, g: torch.Generator | None = None) -> torch.Tensor:
    """Perturb the haematoxylin/eosin/DAB optical densities: od' = od * alpha + beta."""
    n, dev = x.shape[0], x.device
    sigma = MAX_HED * strength
    alpha = 1 + (torch.rand(n, 3, 1, 1, generator=g, device=dev) * 2 - 1) * sigma
    beta = (torch.rand(n, 3, 1, 1, generator=g, device=dev) * 2 - 1) * sigma
    od = -torch.log(x.clamp(min=1e-6))
    hed = torch.einsum("nchw,cd->ndhw", od, _HED_FROM_RGB.to(dev, x.dtype))
    hed = hed * alpha + beta
    od = torch.einsum("ndhw,dc->nchw", hed, _RGB_FROM_HED.to(dev, x.dtype))
    return torch.exp(-od)


def colour_jitter(x: torch.Tensor, strength: float, g: torch.Generator | None = None) -> torch.Tensor:
    """Brightness, contrast, saturation (blends) and hue (rotation about the grey axis)."""
    n, dev = x.shape[0], x.device
    luma_w = _LUMA.to(dev, x.dtype).view(1, 3, 1, 1)
    b = _uniform(n, -MAX_BRIGHTNESS * strength, MAX_BRIGHTNESS * strength, g, dev).view(-1, 1, 1, 1)
    c = 1 + _uniform(n, -MAX_CONTRAST * strength, MAX_CONTRAST * strength, g, dev).view(-1, 1, 1, 1)
    s = 1 + _uniform(n, -MAX_SATURATION * strength, MAX_SATURATION * strength, g, dev).view(-1, 1, 1, 1)
    h = _uniform(n, -MAX_HUE * strength, MAX_HUE * strength, g, dev) * 2 * math.pi
    x = x * (1 + b)
    grey = (x * luma_w).sum(1, keepdim=True)
    x = (x - grey.mean((2, 3), keepdim=True)) * c + grey.mean((2, 3), keepdim=True)
    grey = (x * luma_w).sum(1, keepdim=True)
    x = (x - grey) * s + grey
    # Hue: rotate RGB about the (1,1,1) axis by angle h (Rodrigues), one 3x3 matrix per sample.
    cos, sin = h.cos().view(-1, 1, 1), h.sin().view(-1, 1, 1)
    eye = torch.eye(3, device=dev, dtype=x.dtype)
    k = torch.tensor([[0, -1, 1], [1, 0, -1], [-1, 1, 0]], device=dev, dtype=x.dtype) / math.sqrt(3)
    rot = eye + sin * k + (1 - cos) * (k @ k)
    return torch.einsum("nij,njhw->nihw", rot, x)


def augment_batch(x: torch.Tensor, strength: float, g: torch.Generator | None = None) -> torch.Tensor:
    """Augment a float batch in [0, 1]; ``strength`` 0 is the identity, 1 the strongest."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"aug_strength must be in [0, 1], got {strength}")
    if strength == 0:
        return x
    x = random_dihedral(x, g)
    x = random_affine(x, strength, g)
    x = hed_jitter(x, strength, g)
    x = colour_jitter(x, strength, g)
    return x.clamp_(0.0, 1.0)
