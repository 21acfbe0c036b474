"""train_pcam / fit on real (tiny) caches: learning, Ray Tune reporting + checkpoints + resume,
divergence, model files, the CLI."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
import ray
from ray import tune

from datasets.errors import UserError
from trainables.train import (CHECKPOINT_FILE, PREDICTIONS_FILE, fit, load_checkpoint, load_model,
                              predict_proba, resolve_config, save_model, train_pcam)

REPO = Path(__file__).resolve().parents[1]
TINY = {"backbone": "baseline", "batch_size": 16, "aug_strength": 0.5, "val_fraction": 0.25}


def write_toy_kaggle(folder: Path, n: int = 128, seed: int = 0) -> Path:
    """A learnable toy in the Kaggle layout: positives have a dark blob in the centre 32x32."""
    rng = np.random.default_rng(seed)
    (folder / "train").mkdir(parents=True)
    labels = rng.permutation(np.arange(n) % 2)
    ids = [f"{i:040x}" for i in rng.integers(0, 2**62, n)]
    for pid, y in zip(ids, labels):
        img = rng.integers(150, 230, (96, 96, 3), dtype=np.uint8)
        if y:
            cy, cx = rng.integers(36, 52, 2)
            img[cy:cy + 10, cx:cx + 10] = rng.integers(20, 70, (10, 10, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / "train" / f"{pid}.tif")
    pd.DataFrame({"id": ids, "label": labels}).to_csv(folder / "train_labels.csv", index=False)
    return folder


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory) -> Path:
    return write_toy_kaggle(tmp_path_factory.mktemp("toy") / "data")


@pytest.fixture(scope="session")
def toy_cache(toy_dir, tmp_path_factory):
    from datasets.cache import prepare_dataset
    return prepare_dataset(str(toy_dir), str(tmp_path_factory.mktemp("cache")), progress=False)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_fit_really_learns_the_toy(toy_cache):
    from datasets.splits import train_val_split
    train_idx, val_idx = train_val_split(toy_cache, val_fraction=0.25, seed=0)
    cfg = {**TINY, "backbone": "baseline_bn", "lr": 3e-3, "epochs": 3, "pos_weight": "auto"}
    seen = []
    model, history = fit(cfg, toy_cache, train_idx, val_idx, on_epoch=lambda m, s, p: seen.append((m, s, p)))
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_auc"] > 0.8
    assert [h["trial_status"] for h in history] == ["running", "running", "completed"]
    metrics, state, (labels, probs) = seen[-1]
    assert state["epoch"] == 3 and len(probs) == len(val_idx) == len(labels)
    # TTA over the 8 dihedral views: still probabilities, and a symmetric toy keeps its ranking.
    p = predict_proba(model, toy_cache.images[val_idx], cfg, tta=True)
    assert p.dtype == np.float32 and ((p >= 0) & (p <= 1)).all()
    from sklearn.metrics import roc_auc_score
    assert roc_auc_score(toy_cache.labels[val_idx], p) > 0.8


def test_non_finite_loss_ends_cleanly_as_diverged(toy_cache):
    reports = []
    _, history = fit({**TINY, "lr": 1e10, "epochs": 3}, toy_cache, np.arange(64), np.arange(64, 96),
                     on_epoch=lambda m, s, p: reports.append((m, s)))
    assert len(history) == 1 and history[0]["trial_status"] == "diverged" and history[0]["val_auc"] == 0.5
    assert reports[0][1] is None   # no checkpoint of a NaN model


def test_save_load_round_trip_with_weights_only(toy_cache, tmp_path):
    cfg = {**TINY, "backbone": "baseline_bn", "epochs": 1, "unfreeze_depth": 2}
    model, _ = fit(cfg, toy_cache, np.arange(32))
    path = save_model(tmp_path / "m" / "model.pt", model, cfg)
    blob = torch.load(path, weights_only=True)
    assert blob["config"]["unfreeze_depth"] == 2
    loaded, loaded_cfg = load_model(path, device="cpu")
    x = toy_cache.images[:8]
    assert np.allclose(predict_proba(model.cpu(), x, cfg), predict_proba(loaded, x, loaded_cfg), atol=1e-6)
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(UserError, match="junk.pt"):
        load_model(tmp_path / "junk.pt")


@pytest.mark.parametrize("native", [False, True])
def test_fit_runs_in_the_precision_chosen_at_run_time(toy_cache, monkeypatch, native):
    """auto on a CPU without native bf16 trains in fp32; with it, in bf16 - checked on the conv outputs."""
    from trainables import fastpath
    monkeypatch.setattr(fastpath, "cpu_flags", lambda: frozenset({"avx512_bf16"} if native else {"avx2"}))
    dtypes = set()
    from trainables import loop as train_module
    real_build = train_module.build_model

    def build_and_watch(*args, **kwargs):
        model = real_build(*args, **kwargs)
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda mod, inp, out: dtypes.add((mod.training, out.dtype)) if mod.training else None)
        return model
    monkeypatch.setattr("trainables.loop.build_model", build_and_watch)
    cfg = {**TINY, "backbone": "baseline_bn", "epochs": 1}
    model, history = fit(cfg, toy_cache, np.arange(64), np.arange(64, 96))
    expected = torch.bfloat16 if native else torch.float32
    assert dtypes == {(True, expected)}
    assert history[-1]["fast_path"] == ("bf16" if native else "fp32") + " channels_last"
    assert next(model.parameters()).dtype == torch.float32          # master weights stay fp32
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    # fp32 forced: fp32 whatever the CPU
    dtypes.clear()
    fit({**cfg, "precision": "fp32"}, toy_cache, np.arange(64))
    assert dtypes == {(True, torch.float32)}


def test_fp16_with_a_gradient_scaler_trains_on_the_cpu_and_learns(toy_cache):
    """The path auto takes on pre-Ampere GPUs (fp16 autocast + torch.amp.GradScaler), run on the CPU."""
    from datasets.splits import train_val_split
    train_idx, val_idx = train_val_split(toy_cache, val_fraction=0.25, seed=0)
    # 48 px (the toy's blob survives the resize): torch's fp16 convolutions on a CPU are ~6x slower than fp32.
    cfg = {**TINY, "backbone": "baseline_bn", "lr": 3e-3, "epochs": 2, "pos_weight": "auto", "precision": "fp16",
           "input_size": 48}
    states = []
    model, history = fit(cfg, toy_cache, train_idx, val_idx, on_epoch=lambda m, s, p: states.append(copy.deepcopy(s)))
    assert {h["fast_path"] for h in history} == {"fp16 channels_last"}
    assert history[-1]["train_loss"] < history[0]["train_loss"] and history[-1]["val_auc"] > 0.8
    assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32
    scaler = states[-1]["scaler"]  # the scaler ran (its state is checkpointed for a resume)
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] >= 0
    # resumed from epoch 1's checkpoint (scaler included), epoch 2 is what the uninterrupted run computed
    _, resumed = fit(cfg, toy_cache, train_idx, val_idx, resume=states[0])
    assert resumed[-1]["train_loss"] == pytest.approx(history[-1]["train_loss"], rel=1e-5)


def test_tta_is_the_mean_over_the_eight_per_sample_dihedral_views(toy_cache):
    from trainables.augment import dihedral
    from trainables.train import to_input
    cfg = resolve_config({**TINY, "backbone": "baseline_bn", "epochs": 1, "precision": "fp32"})
    model, _ = fit(cfg, toy_cache, np.arange(64))
    x_u8 = toy_cache.images[:40]
    x = to_input(torch.from_numpy(np.array(x_u8)), cfg, aug=False).contiguous()
    model.eval()
    with torch.no_grad():
        ref = torch.stack([torch.sigmoid(model(dihedral(x, torch.full((len(x),), k)))) for k in range(8)]).mean(0)
    got = predict_proba(model, x_u8, cfg, tta=True, batch_size=16)   # 3 batches, the last one short
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-5)
    # bf16 inference of the same model: the same scores to bf16 precision
    bf16 = predict_proba(model, x_u8, {**cfg, "precision": "bf16"}, tta=True)
    assert np.abs(bf16 - got).max() < 0.02


def test_optimizer_is_fused_adamw_with_warmup_then_cosine():
    from trainables.models import build_model
    from trainables.train import make_optimizer
    model = build_model("baseline_bn", pretrained=False, unfreeze_depth=0)      # head only
    cfg = resolve_config({"backbone": "baseline_bn", "lr": 1e-2, "epochs": 2, "warmup_epochs": 0.5})
    opt, sched = make_optimizer(model, cfg, steps_per_epoch=10)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad)             # frozen stages left out
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2e-3) and lrs[4] == pytest.approx(1e-2)     # 5 warm-up steps
    assert lrs[5] == lrs[4] and all(a > b for a, b in zip(lrs[5:], lrs[6:])) and lrs[-1] < 1e-3  # cosine to ~0


def test_config_typos_are_user_errors():
    with pytest.raises(UserError, match="learning_rate"):
        resolve_config({"learning_rate": 0.1})
    with pytest.raises(UserError, match="aug_strength"):
        resolve_config({"aug_strength": 2})


# --- Ray Tune -----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def ray_session():
    # Share a Ray instance another test module may have started; shut down only our own.
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    if started:
        ray.shutdown()


class KillAfterFirstCheckpoint(tune.Callback):
    """Kills the healthy trial's worker once its epoch-1 checkpoint is saved, as a preempted node or
    an OOM kill would: Tune must restore the trial from that checkpoint."""

    killed = recovered = None

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.recovered = trial.trial_id

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if self.killed is None and trial.config["lr"] < 1:
            self.killed = trial.trial_id
            ray.kill(trial.temporary_state.ray_actor)


@pytest.fixture(scope="session")
def tune_run(ray_session, toy_cache, tmp_path_factory):
    """One genuine Tuner run: a healthy trial (2 epochs, its worker killed after epoch 1 and restored
    by Tune) and a diverging one (lr=1e10)."""
    killer = KillAfterFirstCheckpoint()
    trainable = tune.with_resources(tune.with_parameters(train_pcam, cache_path=str(toy_cache.path)), {"cpu": 1})
    tuner = tune.Tuner(
        trainable,
        param_space={**TINY, "epochs": 2, "lr": tune.grid_search([3e-3, 1e10])},
        tune_config=tune.TuneConfig(metric="val_auc", mode="max"),
        run_config=tune.RunConfig(name="tiny", storage_path=str(tmp_path_factory.mktemp("ray")), verbose=0,
                                  callbacks=[killer], failure_config=tune.FailureConfig(max_failures=1),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=None)))
    return tuner.fit(), killer


def test_tune_reports_and_checkpoints_every_epoch(tune_run):
    grid, _ = tune_run
    assert not grid.errors
    by_lr = {r.config["lr"]: r for r in grid}
    good, bad = by_lr[3e-3], by_lr[1e10]
    ckpts = sorted(good.best_checkpoints, key=lambda c: c[1]["epoch"])
    assert [m["epoch"] for _, m in ckpts] == [1, 2]                      # one checkpoint per epoch
    assert [m["trial_status"] for _, m in ckpts] == ["running", "completed"]
    for _, m in ckpts:
        for key in ["val_auc", "val_loss", "val_acc", "train_loss", "lr", "epoch_seconds", "images_per_s"]:
            assert np.isfinite(m[key]), key
    with ckpts[-1][0].as_directory() as d:
        state = load_checkpoint(d)                       # torch.load(weights_only=True)
        preds = np.load(Path(d) / PREDICTIONS_FILE)
        assert (Path(d) / CHECKPOINT_FILE).is_file()
    assert state["epoch"] == 2 and len(state["history"]) == 2 and len(preds["probs"]) == len(preds["labels"])
    assert bad.metrics["trial_status"] == "diverged" and bad.metrics["val_auc"] == 0.5
    assert len(bad.metrics_dataframe) == 1 and bad.checkpoint is None


def test_tune_resumes_a_killed_trial_at_the_next_epoch(tune_run, toy_cache):
    grid, killer = tune_run
    good = next(r for r in grid if r.config["lr"] == 3e-3)
    assert killer.killed == good.metrics["trial_id"] == killer.recovered   # killed, then recovered by Tune
    # Tune restored the iteration count (1) from the checkpoint; had train_pcam ignored that
    # checkpoint it would have started over and reported epoch 1 again as iteration 2.
    assert good.metrics["training_iteration"] == 2 and good.metrics["epoch"] == 2
    assert good.metrics["trial_status"] == "completed"
    epochs = list(good.metrics_dataframe["epoch"])
    assert epochs[-1] == 2 and len(epochs) == len(set(epochs))
    # ... and reproduced what an uninterrupted run computes (RNG streams seeded per epoch).
    from datasets.splits import train_val_split
    train_idx, val_idx = train_val_split(toy_cache, val_fraction=TINY["val_fraction"], seed=0)
    _, history = fit({**TINY, "epochs": 2, "lr": 3e-3}, toy_cache, train_idx, val_idx)
    assert good.metrics["train_loss"] == pytest.approx(history[-1]["train_loss"], rel=1e-4)
    assert good.metrics["val_auc"] == pytest.approx(history[-1]["val_auc"], abs=1e-4)


def test_a_trial_records_its_rows_once_in_its_folder_and_keeps_them_when_resumed(tune_run, toy_cache):
    """split_rows.npz: one file per trial beside params.json, none in the epochs' checkpoints, still one after
    the healthy trial was killed and restored from its checkpoint (it reads the file its first run wrote)."""
    from datasets.splits import train_val_split
    from trainables.trainable import SPLIT_FILE

    grid, killer = tune_run
    good = next(r for r in grid if r.config["lr"] == 3e-3)
    trial_dir = Path(good.path)
    assert killer.recovered == good.metrics["trial_id"]
    assert [p.relative_to(trial_dir) for p in trial_dir.rglob(SPLIT_FILE)] == [Path(SPLIT_FILE)]
    assert len(list(trial_dir.glob("checkpoint_*"))) == 2  # both epochs' checkpoints, without the rows
    train_idx, val_idx = train_val_split(toy_cache, val_fraction=TINY["val_fraction"], seed=0)
    with np.load(trial_dir / SPLIT_FILE) as rows:
        assert rows["train_rows"].dtype == np.int32
        assert np.array_equal(rows["train_rows"], train_idx) and np.array_equal(rows["val_rows"], val_idx)
    bad = next(r for r in grid if r.config["lr"] == 1e10)
    assert (Path(bad.path) / SPLIT_FILE).is_file()  # a trial without a checkpoint records its rows too


# --- CLI ----------------------------------------------------------------------------------------

def test_cli_prints_one_line_per_epoch(toy_dir, tmp_path, capsys, monkeypatch):
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "TORCH_HOME": str(tmp_path / "th")}
    args = ["--epochs", "1", "--batch-size", "16", "--max-train-samples", "48", "--data-dir", str(toy_dir),
            "--cache-dir", str(tmp_path / "c")]
    out = subprocess.run([sys.executable, "-m", "trainables.train", "--backbone", "baseline", *args,
                          "--precision", "fp32", "--device", "cpu", "--out", str(tmp_path / "model.pt")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [l for l in out.stdout.splitlines() if l.startswith("epoch")]
    assert len(lines) == 1 and "val_auc" in lines[0] and "img/s" in lines[0] and "completed" in lines[0]
    assert "baseline: fp32 NCHW on cpu (precision fp32 requested: the reference path, PyTorch's defaults), " in out.stdout
    assert load_model(tmp_path / "model.pt")[1]["precision"] == "fp32"   # a refit/predict reproduces it
    # Pretrained weights missing offline: one line naming the file, exit 2, no traceback.
    from trainables.train import main
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    assert main(["--backbone", "resnet18", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "resnet18-f37072fd.pth" in err
    # --device: a device this machine lacks, or a misspelt one, is one line before any data is read.
    monkeypatch.setattr("trainables.device.cuda_device_count", lambda: 0)
    for device, expected in (("cuda:1", "error: --device cuda:1: this machine has 0 CUDA device(s); use --device cpu"),
                             ("gpu", "error: --device 'gpu': choose auto")):
        assert main([*args, "--device", device]) == 2
        assert capsys.readouterr().err.strip().startswith(expected)


def test_validation_loss_is_sklearns_log_loss_and_equals_the_former_formula():
    """val_loss = sklearn.metrics.log_loss on probabilities clipped to [1e-7, 1 - 1e-7]: the same number as the
    hand-written binary cross-entropy it replaced, certain misses and one-class sets included."""
    from trainables.engine import validation_scores

    def former(y, probs):
        p = np.clip(probs, 1e-7, 1 - 1e-7)
        return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300).astype(np.float32)
    probs = np.clip(y * 0.4 + rng.random(300) * 0.6, 0, 1).astype(np.float32)
    probs[:3] = [0.0, 1.0, 1.0]  # certain (clipped) predictions, right or wrong
    for labels, p in ((y, probs), (np.ones(5, np.float32), probs[:5])):
        assert validation_scores(labels, p)["val_loss"] == pytest.approx(former(labels, p), rel=1e-6)
    s = validation_scores(y, probs)
    assert s["val_acc"] == pytest.approx(((probs >= 0.5) == (y == 1)).mean())
    assert validation_scores(np.ones(5, np.float32), probs[:5])["val_auc"] == 0.5


def test_a_config_is_resolved_once_and_the_registry_asked_once_on_the_way_to_a_model(toy_cache, tmp_path, monkeypatch):
    """train_pcam resolves the user's dict once; fit, the model and its weights take that ResolvedConfig (and its
    backbone_spec) as it is. Counted on a torchvision backbone, whose build also finds its weights."""
    import trainables.backbones
    from trainables.config import ResolvedConfig

    asked = []
    real = trainables.backbones.get_backbone

    def counting(name):
        asked.append(name)
        return real(name)
    for module in ("trainables.config", "trainables.models", "trainables.weights", "trainables.backbones"):
        monkeypatch.setattr(f"{module}.get_backbone", counting)
    cfg = {**TINY, "backbone": "mobilenet_v2", "pretrained": True, "epochs": 1, "unfreeze_depth": 1}
    model, history = train_pcam(cfg, cache_path=str(toy_cache.path), device="cpu")
    assert asked == ["mobilenet_v2"] and history[-1]["epoch"] == 1
    resolved = resolve_config(cfg)
    assert isinstance(resolved, ResolvedConfig) and resolve_config(resolved) is resolved
    assert resolved == resolve_config(dict(resolved))  # a dict to every reader


def test_a_resolved_config_stays_resolved_and_files_hold_plain_dicts(toy_cache, tmp_path):
    import copy
    import pickle

    cfg = resolve_config({**TINY, "epochs": 1})
    with pytest.raises(UserError, match="precision"):
        cfg["precision"] = "fp8"
    with pytest.raises(UserError, match="unknown config key"):
        cfg["learning_rate"] = 0.1
    with pytest.raises(TypeError):
        del cfg["lr"]
    cfg["precision"] = "fp32"  # a checked change (search.predict's --precision)
    cfg["backbone"] = "baseline_bn"
    assert cfg.backbone_spec.name == "baseline_bn" and cfg.replace(epochs=3)["epochs"] == 3 and cfg["epochs"] == 1
    for copied in (pickle.loads(pickle.dumps(cfg)), copy.deepcopy(cfg)):
        assert copied == cfg and copied.backbone_spec.name == "baseline_bn"
    states = []
    model, _ = fit(cfg, toy_cache, np.arange(32), on_epoch=lambda m, s, p: states.append(s))
    assert type(states[0]["config"]) is dict
    path = save_model(tmp_path / "model.pt", model, cfg)
    blob = torch.load(path, weights_only=True)  # pcam-tune-model/1, as before: a plain dict config
    assert blob["format"] == "pcam-tune-model/1" and type(blob["config"]) is dict and blob["config"] == cfg
