"""Model registry: single-logit heads, stage-wise unfreezing, frozen BatchNorm kept in eval mode."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from datasets.errors import UserError
from trainables.models import (MODELS, build_model, count_trainable, is_pretrainable, normalization_for,
                               num_stages)

TORCHVISION = [n for n in MODELS if is_pretrainable(n)]


def test_registry_has_the_promised_backbones():
    expected = {"baseline", "baseline_bn", "resnet18", "resnet34", "resnet50", "mobilenet_v2",
                "mobilenet_v3_large", "efficientnet_b0", "densenet121", "vgg16_bn"}
    assert expected <= set(MODELS)
    assert not is_pretrainable("baseline") and not is_pretrainable("baseline_bn")
    assert set(TORCHVISION) == expected - {"baseline", "baseline_bn"}


@pytest.mark.parametrize("name", list(MODELS))
def test_trainable_parameters_grow_with_unfreeze_depth(name):
    torch.manual_seed(0)
    model = build_model(name, pretrained=False, unfreeze_depth=0)
    head_only = count_trainable(model)
    total = sum(p.numel() for p in model.parameters())
    counts = []
    for depth in range(num_stages(name) + 1):
        model.set_unfreeze_depth(depth)
        counts.append(count_trainable(model))
    assert counts[0] == head_only > 0
    assert all(a < b for a, b in zip(counts, counts[1:])), counts   # strictly: every stage has weights
    assert counts[-1] == total                                        # all stages = full fine-tune
    assert model.set_unfreeze_depth(None) == num_stages(name) and count_trainable(model) == total
    assert model.set_unfreeze_depth(99) == num_stages(name)           # deeper than the net = all


@pytest.mark.parametrize("name", ["baseline_bn", "resnet18", "mobilenet_v2"])
def test_single_logit_output_at_native_and_upsampled_size(name):
    model = build_model(name, pretrained=False).eval()
    for size in (96, 128):
        with torch.no_grad():
            out = model(torch.rand(2, 3, size, size))
        assert out.shape == (2,)


def test_frozen_batchnorm_stays_in_eval_mode_after_train():
    model = build_model("resnet18", pretrained=False, unfreeze_depth=1)   # only layer4 + head train
    model.train()
    frozen_bn = [model.net.bn1, *[m for m in model.net.layer3.modules() if isinstance(m, nn.BatchNorm2d)]]
    live_bn = [m for m in model.net.layer4.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not bn.training for bn in frozen_bn)
    assert all(bn.training for bn in live_bn)
    before = model.net.bn1.running_mean.clone()
    model(torch.rand(4, 3, 96, 96) * 5)
    assert torch.equal(model.net.bn1.running_mean, before)              # frozen statistics do not drift
    assert not torch.equal(live_bn[0].running_mean, torch.zeros_like(live_bn[0].running_mean))
    model.set_unfreeze_depth(None)
    assert model.training and all(bn.training for bn in frozen_bn)


def test_normalisation_follows_the_weights():
    assert normalization_for("resnet18", pretrained=True)[0] == (0.485, 0.456, 0.406)
    assert normalization_for("resnet18", pretrained=False) == normalization_for("baseline_bn")
    model = build_model("baseline_bn", pretrained=False)
    assert torch.allclose(model.mean.flatten(), torch.tensor(normalization_for("baseline_bn")[0]))


def test_bad_names_and_depths_are_user_errors():
    with pytest.raises(UserError, match="unknown backbone 'resnet19'.*resnet18"):
        build_model("resnet19", pretrained=False)
    with pytest.raises(UserError, match="unfreeze_depth"):
        build_model("baseline", pretrained=False, unfreeze_depth=-1)
