"""Device-side batch augmentation: exact identity at strength 0, label-preserving geometry."""
from __future__ import annotations

import math

import pytest
import torch

from trainables import augment
from trainables.augment import augment_batch, dihedral


def _batch(n=16, size=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def test_strength_zero_is_the_exact_identity():
    x = _batch()
    assert torch.equal(augment_batch(x.clone(), 0.0), x)


def test_the_eight_dihedral_views_are_distinct_and_preserve_the_centre():
    x = _batch(1)
    views = torch.cat([dihedral(x, torch.tensor([k])) for k in range(8)])
    assert len({v.numpy().tobytes() for v in views}) == 8                # all 8 symmetries, no repeats
    centre = x[0, :, 32:64, 32:64]
    originals = {tuple(sorted(centre[c].flatten().tolist())) for c in range(3)}
    for v in views:
        # The centre 32x32 maps onto itself: same pixel values, only rearranged.
        assert {tuple(sorted(v[c, 32:64, 32:64].flatten().tolist())) for c in range(3)} == originals
        assert torch.equal(v.flatten(1).sort().values, x[0].flatten(1).sort().values)
    # Group closure: k=3 (left-right flip, then transpose) is a 90-degree rotation.
    assert torch.equal(views[3], torch.rot90(x[0], k=1, dims=(1, 2)))


def test_dihedral_choice_is_per_sample_and_vectorised():
    x = _batch(8)
    k = torch.arange(8)
    out = dihedral(x, k)
    for i in range(8):
        assert torch.equal(out[i], dihedral(x[i:i + 1], k[i:i + 1])[0])


def test_whole_batch_views_equal_the_per_sample_definition():
    x = _batch(3)
    for k in range(8):
        assert torch.equal(augment.dihedral_view(x, k), dihedral(x, torch.full((3,), k)))


def test_uint8_batches_augment_like_their_float_values():
    """The /255 rides in the colour matrix for uint8 input: the same images as float input gives."""
    x = (_batch(8) * 255).round().to(torch.uint8)
    for strength in (0.0, 0.4, 1.0):
        a = augment_batch(x, strength, torch.Generator().manual_seed(2))
        b = augment_batch(x.float() / 255, strength, torch.Generator().manual_seed(2))
        assert a.dtype == torch.float32 and torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("strength", [0.3, 1.0])
def test_zoom_and_shift_keep_the_centre_patch_in_view(strength):
    n, size = 500, 96
    idx = augment.geometry_index(n, size, strength, torch.Generator().manual_seed(1))
    centre = torch.tensor([r * size + c for r in range(32, 64) for c in range(32, 64)])
    # Output pixels showing the centre square: about 32x32 / scale^2 of them, never fewer than a
    # full zoom-out allows (a shift pushing the square out of frame would cut this count).
    shown = torch.isin(idx, centre).sum(1).float()
    least = 32 * 32 / (1 + augment.MAX_ZOOM * strength) ** 2 - 2 * 32
    assert (shown >= least).all(), shown.min()
    # ... and every centre pixel is shown when zooming in (no pixel skipped).
    zoom_in = shown >= 32 * 32
    assert zoom_in.any() and all(torch.isin(centre, row).all() for row in idx[zoom_in])
    assert idx.min() >= 0 and idx.max() < size * size
    moved = (idx != torch.arange(size * size)).any(1).float().mean()
    assert moved > 0.85                                       # (7/8 of the dihedral views move pixels)


def test_uint8_and_float_batches_get_the_same_geometry():
    x = (_batch(4) * 255).round().to(torch.uint8)
    a = augment.random_geometry(x, 1.0, torch.Generator().manual_seed(3))
    b = augment.random_geometry(x.float(), 1.0, torch.Generator().manual_seed(3))
    assert a.dtype == torch.uint8 and torch.equal(a.float(), b)


def test_augmentation_stays_in_range_scales_with_strength_and_is_seeded():
    x = _batch(32)
    weak = augment_batch(x.clone(), 0.1, torch.Generator().manual_seed(0))
    strong = augment_batch(x.clone(), 1.0, torch.Generator().manual_seed(0))
    again = augment_batch(x.clone(), 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(strong, again)
    assert weak.min() >= 0 and strong.max() <= 1 and strong.shape == x.shape
    # Colour change grows with strength: compare the per-image mean colour, which geometry barely moves.
    d = lambda y: (y.mean((2, 3)) - x.mean((2, 3))).abs().mean()
    assert d(weak) < d(strong)


def test_colour_jitter_keeps_grey_grey_and_rejects_bad_strength():
    grey = torch.full((4, 3, 8, 8), 0.5)
    out = augment.colour_jitter(grey, 1.0, torch.Generator().manual_seed(0))
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-5) and torch.allclose(out[:, 1], out[:, 2], atol=1e-5)
    with pytest.raises(ValueError):
        augment_batch(grey, 1.5)


def test_folded_colour_matrix_equals_the_step_by_step_definition(monkeypatch):
    x = _batch(3, size=8)
    rand = torch.rand(4, 3, generator=torch.Generator().manual_seed(5)) * 2 - 1   # b, c, s, h draws
    draws = iter(rand)
    monkeypatch.setattr(augment, "_uniform", lambda shape, bound, g, dev: next(draws) * bound)
    out = augment.colour_jitter(x, 1.0)
    b, c, s, h = (1 + rand[0] * augment.MAX_BRIGHTNESS, 1 + rand[1] * augment.MAX_CONTRAST,
                  1 + rand[2] * augment.MAX_SATURATION, rand[3] * augment.MAX_HUE * 2 * math.pi)
    luma = torch.tensor(augment._LUMA).view(1, 3, 1, 1)
    v = lambda t: t.view(-1, 1, 1, 1)
    y = x * v(b)
    m = (y * luma).sum(1, keepdim=True)[:, :, ::4, ::4].mean((2, 3), keepdim=True)
    y = (y - m) * v(c) + m
    grey = (y * luma).sum(1, keepdim=True)
    y = (y - grey) * v(s) + grey
    # hue: rotate about the grey axis, checked against Rodrigues' formula on each pixel vector
    axis = torch.ones(3) / math.sqrt(3)
    vec = y.permute(0, 2, 3, 1)
    cos, sin = v(h.cos()), v(h.sin())
    rotated = vec * cos + torch.cross(axis.expand_as(vec), vec, dim=-1) * sin + axis * (vec @ axis)[..., None] * (1 - cos)
    assert torch.allclose(out, rotated.permute(0, 3, 1, 2), atol=1e-5)


def test_bf16_batches_are_the_fp32_augmentation_to_bf16_precision():
    """A bf16 model's batches: the same draws and pixels as fp32, within bf16's rounding of the colour matrix."""
    x = torch.randint(0, 256, (16, 3, 96, 96), dtype=torch.uint8)
    a = augment.augment_batch(x, 0.7, torch.Generator().manual_seed(4))
    b = augment.augment_batch(x, 0.7, torch.Generator().manual_seed(4), dtype=torch.bfloat16)
    assert b.dtype == torch.bfloat16 and b.shape == a.shape
    assert (a - b.float()).abs().max() < 0.01      # bf16 keeps 8 bits: ~1/256 relative
    assert torch.equal(augment.augment_batch(x, 0.0, dtype=torch.bfloat16), x.to(torch.bfloat16) / 255)


def test_shift_and_zoom_move_the_label_square_by_at_most_3_px():
    """The label is decided by the centre 32x32 px; shift and zoom move pixels across its border (tumour in or out).
    The chosen bound (docs/training.md has the measurement): at any strength, the output's centre square shows
    only source pixels within 3 px of the source's centre square, in both the torch and the CPU kernel path (they
    share these index maps)."""
    n, size = 4000, 96
    assert augment.LABEL_MARGIN == 3
    reach = 0
    for strength in (0.5, 1.0):
        geo = augment.geometry_params(n, size, strength, torch.Generator().manual_seed(7))
        for src in (geo.rows[:, 32:64], geo.cols[:, 32:64]):
            assert src.min() >= 32 - augment.LABEL_MARGIN and src.max() <= 63 + augment.LABEL_MARGIN
            reach = max(reach, 32 - src.min(), src.max() - 63)
    assert reach == augment.LABEL_MARGIN  # reached: shift and zoom still act, up to the bound
