"""One epoch and one evaluation: batches out of the decode-once memmap, the loss, the optimiser and its schedule,
a training pass, and validation predictions (torchvision's references keep ``train_one_epoch`` and ``evaluate``
together the same way). trainables.loop runs them epoch after epoch.

Batches are fancy-indexed straight out of the uint8 memmap (datasets.cache) and everything after that - float
conversion, augmentation, normalisation, resizing - happens batch-wise on the training device: on a CPU in one
fused pass (trainables.augment_cpu), elsewhere as torch ops (trainables.augment). On CUDA a background thread
gathers the next batch into pinned memory and its copy overlaps the current step (trainables.device).
"""
from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainables import augment
from trainables.augment import dihedral_view
from trainables.config import fast_path
from trainables.device import prefetch_to_cuda
from trainables.fastpath import FastPath, reuse_freed_memory


def report_diverged(history: list, objective, on_epoch, **fields) -> dict:
    """The epoch a trial diverged in (its loss not finite), reported and appended to ``history``: val AUC 0.5 (a
    diverged net is a constant predictor), and the objective so far (``objective`` = trainables.loop.best_of). Tune
    needs the metric in every result; the search tells TPE a diverged trial FAILED and ranks it last."""
    nan = float("nan")
    metrics = {"val_auc": 0.5, "val_loss": nan, "val_acc": nan, "train_loss": nan, "images_per_s": 0.0,
               "trial_status": "diverged", **fields}
    best, at = objective(history)
    metrics.update(best_val_auc=0.5 if best != best else best, best_epoch=at)
    history.append(metrics)
    if on_epoch:
        on_epoch(metrics, None, None)
    return metrics


class Diverged(Exception):
    """The training loss became NaN/inf."""


def get_batch(images: np.ndarray, labels: np.ndarray, idx: np.ndarray, device: torch.device):
    """Rows ``idx`` of the uint8 memmap as (uint8 NHWC images, float labels) on ``device``."""
    idx = np.sort(idx)  # sequential reads from the memmap; order inside a batch is irrelevant
    x = torch.from_numpy(np.ascontiguousarray(images[idx]))
    y = torch.from_numpy(labels[idx].astype(np.float32))
    if device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def to_input(x_u8: torch.Tensor, cfg: dict, aug: bool, g: torch.Generator | None = None,
             dtype: torch.dtype = torch.float32, channels_last: bool = False,
             normalise: tuple[Sequence[float], Sequence[float]] | None = None) -> torch.Tensor:
    """uint8 NHWC -> float (N, 3, H, W) of ``dtype`` in [0, 1], augmented (training), resized to input_size.

    ``normalise`` = (mean, std) per channel: deliver normalised images instead (the model is then called
    with ``normalised=True``). ``dtype`` and ``channels_last`` are the model's (FastPath.input_dtype and
    .channels_last): bf16 for a model under bf16 autocast (it would round its input to bf16 anyway),
    so nothing converts or copies the batch again before the first layer.
    """
    strength = float(cfg["aug_strength"]) if aug else 0.0
    # The same function twice: one fused pass on a CPU, torch ops elsewhere (tested equal). Imported here: a
    # GPU machine needs no numba (the GPU bench runs in a stock PyTorch container).
    if x_u8.device.type == "cpu":
        from trainables.augment_cpu import augment_nhwc as impl
    else:
        impl = augment.augment_nhwc
    x = impl(x_u8, strength, g, dtype, channels_last, normalise)
    size = int(cfg["input_size"] or x.shape[-1])
    if size != x.shape[-1]:
        # Augment at native resolution first: upsampling is the expensive part.
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def model_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, criterion,
               path: FastPath) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward (in ``path``'s precision) of a normalised batch (to_input(..., normalise=
    model.input_normalization())) + loss in fp32. Returns (loss, float logits)."""
    with path.autocast():
        logits = model(x, normalised=True)
    logits = logits.float()
    return criterion(logits, y), logits


class SmoothedBCE(nn.Module):
    """BCE-with-logits with optional label smoothing (towards 0.5) and pos_weight."""

    def __init__(self, label_smoothing: float = 0.0, pos_weight: float | None = None):
        super().__init__()
        self.smoothing = float(label_smoothing)
        self.register_buffer("pos_weight", None if pos_weight is None else torch.tensor(float(pos_weight)))

    def forward(self, logits, y):
        if self.smoothing:
            y = y * (1 - self.smoothing) + 0.5 * self.smoothing
        return F.binary_cross_entropy_with_logits(logits, y, pos_weight=self.pos_weight)


def resolve_pos_weight(cfg: dict, train_labels: np.ndarray) -> float | None:
    pw = cfg["pos_weight"]
    if pw == "auto":
        pos = int((train_labels == 1).sum())
        return float((len(train_labels) - pos) / max(pos, 1))
    return None if pw is None else float(pw)


def make_optimizer(model: nn.Module, cfg: dict, steps_per_epoch: int):
    """AdamW with linear warm-up then cosine decay, stepped per batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel: one pass per parameter for the whole update. PyTorch's default on a CPU is a
    # Python loop of a dozen ops per parameter: resnet18's step took 17 ms instead of 4 on 2 cores.
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    opt = torch.optim.AdamW(params, lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]), fused=fused)
    total = max(1, int(cfg["epochs"]) * steps_per_epoch)
    warm = int(float(cfg["warmup_epochs"]) * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def batches_per_epoch(n: int, batch_size: int) -> int:
    # A trailing runt (< half a batch) is dropped: BatchNorm statistics of a few images are noise.
    full, rest = divmod(n, batch_size)
    return max(1, full + int(rest > 0 and rest >= batch_size // 2))


def epoch_seed(cfg: dict, epoch: int) -> int:
    # Seed per (seed, epoch): a run resumed at epoch e draws exactly what it would have drawn.
    return int(cfg["seed"]) * 100_003 + epoch


def epoch_batches(images: np.ndarray, labels: np.ndarray, order: np.ndarray, bs: int, n_batches: int,
                  device: torch.device):
    """(uint8 images, float labels) on ``device`` for each batch of ``order``: prefetched on CUDA."""
    idx = [order[b * bs:(b + 1) * bs] for b in range(n_batches)]
    if device.type == "cuda":
        for x, y in prefetch_to_cuda((images, labels), idx, device):
            yield x, y.float()
        return
    for i in idx:
        yield get_batch(images, labels, i, device)


def train_one_epoch(model, opt, sched, criterion, cache, train_idx, cfg, device, epoch: int,
                    path: FastPath, progress: bool = False, scaler=None) -> tuple[float, int]:
    """One pass over a seeded permutation of ``train_idx``. Returns (mean loss, images seen).

    ``scaler``: a torch.amp.GradScaler (fp16 training, FastPath.grad_scaler): the loss is scaled before the
    backward pass and the step skipped (scale lowered) when a gradient overflowed."""
    model.train()
    seed = epoch_seed(cfg, epoch)
    order = np.random.default_rng(seed).permutation(train_idx)
    # The augmentation's draws are a few hundred numbers per batch: made on the CPU whatever the device.
    g = torch.Generator().manual_seed(seed)
    normalise = model.input_normalization()
    bs = int(cfg["batch_size"])
    n_batches = batches_per_epoch(len(order), bs)
    total, seen = torch.zeros((), device=device), 0
    batches = range(n_batches)
    progress = progress and sys.stderr.isatty()  # a redirected bar is one endless line (datasets.progress)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc=f"epoch {epoch}", unit="batch", leave=False, file=sys.stderr)
    data = epoch_batches(cache.images, cache.labels, order, bs, n_batches, device)
    for b, (x_u8, y) in zip(batches, data):
        x = path.prepare_input(to_input(x_u8, cfg, aug=True, g=g, dtype=path.input_dtype,
                                        channels_last=path.channels_last, normalise=normalise))
        loss, _ = model_step(model, x, y, criterion, path)
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        sched.step()
        total += loss.detach() * len(y)
        seen += len(y)
        # Reading the loss forces a device sync: do it every few steps, not every step. NaN/inf
        # propagate through the sum, so no diverged batch goes unnoticed.
        if b % 16 == 15 or b == n_batches - 1:
            mean = total.item() / seen
            if not math.isfinite(mean):
                raise Diverged(f"non-finite loss at epoch {epoch} batch {b}")
            if progress:
                batches.set_postfix(loss=f"{mean:.4f}")
    return total.item() / seen, seen


def predict_views(model, images: np.ndarray, cfg: dict, idx: np.ndarray | None = None,
                  views: tuple[int, ...] = (0,), batch_size: int | None = None,
                  path: FastPath | None = None) -> np.ndarray:
    """P(tumour) for rows ``idx`` of ``images``, averaged over the given dihedral views.

    ``path``: precision/layout (default: the config's inference choice); ``batch_size``: images per
    forward pass (default: the path's, 64 on CPU). One view of a whole batch is a flip/transpose
    copied into a buffer reused across views, so the only per-batch allocations are the model's own.
    """
    device = next(model.parameters()).device
    path = path or fast_path(cfg, device, training=False)
    batch_size = int(batch_size or path.inference_batch())
    reuse_freed_memory()
    model = path.prepare_model(model.eval())
    idx = np.arange(len(images)) if idx is None else np.asarray(idx)
    out = np.empty(len(idx), dtype=np.float32)
    starts = range(0, len(idx), batch_size)
    if device.type == "cuda":  # rows in order (the output's), the next batch copied while this one computes
        arrays = (x for (x,) in prefetch_to_cuda((images,), [np.sort(idx[s:s + batch_size]) for s in starts],
                                                  device))
        order = [np.argsort(idx[s:s + batch_size], kind="stable") for s in starts]
    else:
        arrays = (torch.from_numpy(np.ascontiguousarray(images[idx[s:s + batch_size]])) for s in starts)
        order = None
    with torch.inference_mode():
        for n, (s, x) in enumerate(zip(starts, arrays)):
            chunk = idx[s:s + batch_size]
            base = path.prepare_input(to_input(x, cfg, aug=False, dtype=path.input_dtype,
                                               channels_last=path.channels_last))
            buf = torch.empty_like(base) if len(views) > 1 or views[0] != 0 else None
            probs = torch.zeros(len(chunk), device=device)
            for k in views:
                view = base if k == 0 else buf.copy_(dihedral_view(base, k))
                with path.autocast():
                    logits = model(view)
                probs += torch.sigmoid(logits.float())
            probs = (probs / len(views)).cpu().numpy()
            if order is not None:  # the prefetcher delivered the rows sorted: put them back in idx's order
                probs[order[n]] = probs.copy()
            out[s:s + len(chunk)] = probs
    return out


def evaluate(model, criterion, cache, val_idx, cfg, path: FastPath | None = None) -> dict:
    """Validation loss/AUC/accuracy (plain BCE, no smoothing: comparable across configs)."""
    probs = predict_views(model, cache.images, cfg, val_idx, path=path)
    if not np.isfinite(probs).all():  # weights blown up while the training loss still looked finite
        raise Diverged("validation predictions are not finite")
    labels = cache.labels[val_idx].astype(np.float32)
    return {**validation_scores(labels, probs), "labels": labels, "probs": probs}


def validation_scores(labels: np.ndarray, probs: np.ndarray) -> dict:
    """val_loss (scikit-learn's log loss of the probabilities, clipped to [1e-7, 1 - 1e-7]: one confident miss
    costs at most ~16, not infinity), val_auc (0.5 when one class is missing) and val_acc (threshold 0.5)."""
    from sklearn.metrics import log_loss, roc_auc_score
    clipped = np.clip(np.asarray(probs, np.float64), 1e-7, 1 - 1e-7)
    return {"val_loss": float(log_loss(labels, clipped, labels=[0, 1])),
            "val_auc": float(roc_auc_score(labels, probs)) if 0 < labels.sum() < len(labels) else 0.5,
            "val_acc": float(((probs >= 0.5) == (labels == 1)).mean())}
