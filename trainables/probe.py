"""Training a head on cached features: what ``fit`` does for a trial with ``unfreeze_depth`` 0.

The frozen backbone's features come from the embedding cache (trainables.embeddings; computed once, by the
search's driver or under a lock), so an epoch is a few matrix products: every training patch in each of its 8
dihedral views (the augmentation; ``aug_strength`` 0: view 0 only), validation on view 0, as ``fit`` validates.
The schedule, optimiser, loss, seeds, divergence rule and per-epoch callback are ``fit``'s. Checkpoints hold the
head only (the backbone is its weights file); the returned model is the whole network (backbone + head), so a
refit saves and serves it like any other.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from trainables.config import ResolvedConfig, resolve_config
from trainables.embeddings import FEATURES, ensure_embeddings, frozen_backbone, uses_cached_features  # noqa: F401
from trainables.engine import (SmoothedBCE, batches_per_epoch, epoch_seed, make_optimizer, report_diverged,
                               resolve_pos_weight, validation_scores)
from trainables.heads import make_head, reset_head


def probe_head(cfg: ResolvedConfig, dim: int) -> torch.nn.Module:
    """The head a probe config trains: its probe head ("linear"/"mlp"), else the backbone's own classifier."""
    if cfg["head"] is not None:
        return make_head(cfg["head"], dim, float(cfg["dropout"]), cfg["head_hidden"])
    from trainables.models import build_model
    with torch.device("meta"):
        own = build_model(cfg.backbone_spec, False, 0, float(cfg["dropout"])).head()
    return own.to_empty(device="cpu")


def model_with_head(cfg: dict, head_state: dict):
    """The whole network: the frozen backbone the features came from + the trained head (eval mode)."""
    cfg = resolve_config(cfg)
    model = frozen_backbone(cfg)
    if cfg["head"] is not None:
        model.use_probe_head(make_head(cfg["head"], _dim(head_state), float(cfg["dropout"]), cfg["head_hidden"]))
    model.head().load_state_dict(head_state)
    return model.eval()


def _dim(head_state: dict) -> int:
    return int(next(v for k, v in head_state.items() if k.endswith("mean")).shape[0])


def _in_tune_session() -> bool:
    """trainables.trainable.in_tune_session's test (that module imports this one through trainables.loop)."""
    import warnings
    try:
        from ray import tune
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tune.get_context().get_trial_id() is not None
    except Exception:
        return False


def _scores(head, feats: torch.Tensor, labels: np.ndarray) -> dict:
    head.eval()
    with torch.inference_mode():
        probs = torch.sigmoid(head(feats).squeeze(-1).float()).numpy()
    if not np.isfinite(probs).all():  # a blown-up head: fit_on_features reports the epoch as diverged
        return {"probs": probs}
    y = labels.astype(np.float32)
    return {**validation_scores(y, probs), "labels": y, "probs": probs}


class TrainingFeatures:
    """The training examples of a head: each view of each training patch, read from the memory-mapped embedding
    cache a batch at a time. Every trial process on a machine shares the file's pages; a float32 copy per process
    would take rows x views x D x 4 bytes (10.7 GB for mobilenet_v2 on the full Kaggle train set) in each of them."""

    def __init__(self, features: np.ndarray, rows: np.ndarray, views: list[int]):
        self.features, self.rows, self.views = features, np.asarray(rows), np.asarray(views)

    def __len__(self) -> int:
        return len(self.rows) * len(self.views)

    def __getitem__(self, examples) -> torch.Tensor:
        """(len(examples), D) float32 of these example numbers (example e = view e % V of training row e // V)."""
        e = np.asarray(examples)
        v = len(self.views)
        return torch.from_numpy(np.asarray(self.features[self.rows[e // v], self.views[e % v]], dtype=np.float32))

    def moments(self, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature mean and (unbiased) standard deviation over all examples, in float64 chunks."""
        total = sq = 0.0
        for s in range(0, len(self.rows), chunk):
            x = np.asarray(self.features[self.rows[s:s + chunk]][:, self.views], dtype=np.float64)
            x = x.reshape(-1, x.shape[-1])
            total, sq = total + x.sum(0), sq + (x * x).sum(0)
        n = len(self)
        mean = total / n
        var = np.maximum(sq - n * mean * mean, 0.0) / max(n - 1, 1)
        return torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(np.sqrt(var).astype(np.float32))


def _training_features(emb, rows: np.ndarray, views: list[int]) -> TrainingFeatures:
    return TrainingFeatures(emb.features, rows, views)


def fit_on_features(cfg: ResolvedConfig, cache, train_idx: np.ndarray, val_idx, on_epoch, resume, stop_epoch, objective,
                    progress: bool = False):
    """``fit`` for a head on cached features (the arguments are fit's; ``objective`` = trainables.loop.best_of)."""
    emb = ensure_embeddings(cache, cfg, progress=progress)
    views = list(range(emb.features.shape[1])) if float(cfg["aug_strength"]) > 0 else [0]
    # Said in the trial's log: the searched aug_strength only chooses 8 views or 1 here (docs/training.md).
    print(f"{cfg['backbone']}: head {cfg['head'] or '(its own)'} on cached features ({emb.path.name}); augmentation: "
          + (f"the {len(views)} dihedral views (aug_strength {float(cfg['aug_strength']):g}: colour, zoom and shift "
             "do not apply to cached features)" if len(views) > 1 else "none (aug_strength 0: view 0 only)"),
          flush=True)
    x_train = _training_features(emb, np.sort(train_idx), views)
    y_rows = cache.labels[np.sort(train_idx)].astype(np.float32)
    y_train = torch.from_numpy(np.repeat(y_rows, len(views)))
    val_idx = None if val_idx is None or not len(val_idx) else np.asarray(val_idx)
    x_val = None if val_idx is None else torch.from_numpy(np.asarray(emb.features[val_idx, 0], dtype=np.float32))

    torch.manual_seed(int(cfg["seed"]))
    head = probe_head(cfg, emb.dim)
    reset_head(head)
    if hasattr(head[0], "set_moments"):
        head[0].set_moments(*x_train.moments())
    criterion = SmoothedBCE(cfg["label_smoothing"], resolve_pos_weight(cfg, y_rows))
    bs = int(cfg["batch_size"])
    opt, sched = make_optimizer(head, cfg, batches_per_epoch(len(x_train), bs))
    history, start = [], 1
    if resume is not None:
        head.load_state_dict(resume["head"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        history, start = list(resume["history"]), int(resume["epoch"]) + 1
    last = min(int(cfg["epochs"]), int(stop_epoch or cfg["epochs"]))
    for epoch in range(start, last + 1):
        torch.manual_seed(epoch_seed(cfg, epoch))
        t0 = time.perf_counter()
        head.train()
        order = torch.from_numpy(np.random.default_rng(epoch_seed(cfg, epoch)).permutation(len(x_train)))
        n_batches = batches_per_epoch(len(order), bs)
        total = torch.zeros(())
        for b in range(n_batches):
            idx = order[b * bs:(b + 1) * bs]
            loss = criterion(head(x_train[idx]).squeeze(-1), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach() * len(idx)
        seen = min(len(order), n_batches * bs)
        train_loss = float(total) / seen
        metrics = {"epoch": epoch, "lr": float(sched.get_last_lr()[0]), "fast_path": "cached features"}
        train_s = time.perf_counter() - t0
        ev = _scores(head, x_val, cache.labels[val_idx]) if x_val is not None and np.isfinite(train_loss) else None
        if not np.isfinite(train_loss) or (ev is not None and not np.isfinite(ev["probs"]).all()):
            report_diverged(history, objective, on_epoch, **metrics, epoch_seconds=time.perf_counter() - t0)
            break
        metrics["train_loss"] = train_loss
        preds = None
        if ev is not None:
            preds = (ev.pop("labels"), ev.pop("probs"))
            metrics.update(ev)
        metrics.update(epoch_seconds=time.perf_counter() - t0, images_per_s=seen / max(train_s, 1e-9),
                       trial_status="completed" if epoch == last else "running")
        history.append(metrics)
        if "val_auc" in metrics:
            metrics["best_val_auc"], metrics["best_epoch"] = objective(history)
        if on_epoch:
            state = {"head": head.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "epoch": epoch, "config": dict(cfg), "history": history}
            on_epoch(metrics, state, preds)
    # Inside a Tune trial nobody takes the network (the checkpoints carry the head): skip building the backbone.
    return (None if _in_tune_session() else model_with_head(cfg, head.state_dict())), history
