"""Device-side batch augmentation: exact identity at strength 0, label-preserving geometry."""
from __future__ import annotations

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
    # Group closure: k=3 (transpose then left-right flip) is a 90-degree rotation.
    assert torch.equal(views[3], torch.rot90(x[0], k=-1, dims=(1, 2)))


def test_dihedral_choice_is_per_sample_and_vectorised():
    x = _batch(8)
    k = torch.arange(8)
    out = dihedral(x, k)
    for i in range(8):
        assert torch.equal(out[i], dihedral(x[i:i + 1], k[i:i + 1])[0])


@pytest.mark.parametrize("strength", [0.3, 1.0])
def test_affine_keeps_the_centre_patch_in_view(strength):
    scale, shift = augment.affine_params(10_000, strength, torch.Generator().manual_seed(1))
    assert (shift.abs() + augment.CENTRE_HALF <= scale[:, None] + 1e-6).all()
    assert scale.min() >= 1 / (1 + augment.MAX_ZOOM * strength) - 1e-6
    assert scale.max() <= 1 + augment.MAX_ZOOM * strength + 1e-6


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
