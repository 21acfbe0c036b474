"""The GPU figures: ``python -m trainables.bench --only gpu [--data-dir DIR]`` (or ``make bench-gpu``).

On one CUDA GPU, with the product's own code paths (trainables.engine / loop / fastpath / device):

  step    per backbone at 96 px, data + training step images/s (train_one_epoch: batches gathered and copied by the
          prefetcher, augmented on the GPU, forward, backward, fused AdamW), --precision fp32 vs auto;
  pack    aggregate training images/s of 1, 2 and 4 trials packed on the GPU (processes, each capped at its share
          of the memory, as fractional Ray trials are), started together;
  parity  validation AUC (8-view TTA, with its standard error) of auto vs fp32, same config and seed, trained on
          real labelled patches from --data-dir (a Kaggle-layout folder: train/*.tif + train_labels.csv);
  infer   8-view TTA inference images/s, fp32 vs auto.

--precision bf16 or fp16 compares a forced precision with fp32 instead of auto (e.g. fp16 vs bf16 on an A100).

Each figure is the median (min-max) of --repeats. It prints tables to paste (Markdown) and refuses in one line on a
machine without CUDA. It needs torch, torchvision and numpy (Pillow comes with torchvision) and the patches: no
Ray, MLflow, Optuna, numba, pandas, scikit-learn or tqdm, so it runs in a stock PyTorch GPU container from a
checkout of this repository (PYTHONPATH=.). ``--cpu-dry-run`` (hidden) runs the same code, tiny, on the CPU: for
the tests only, its figures mean nothing.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from datasets.errors import DataError, UserError

SHARED_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "pcam_sample"
BACKBONES = ("baseline_bn", "resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0")
PARITY = {"batch_size": 64, "lr": 2e-3, "aug_strength": 0.5, "dropout": 0.3, "pretrained": False, "seed": 0}


# --- data ----------------------------------------------------------------------------------------

def load_patches(data_dir: Path, limit: int) -> SimpleNamespace:
    """The first ``limit`` labelled patches of a Kaggle-layout folder, decoded (uint8 NHWC) with their labels."""
    from datasets.images import read_patch

    table = data_dir / "train_labels.csv"
    if not table.is_file():
        raise UserError(f"--data-dir {data_dir}: no train_labels.csv; point it at a Kaggle-layout folder "
                        f"(train/*.tif + train_labels.csv), e.g. the PCam sample")
    with table.open(newline="") as f:
        rows = [(r["id"], int(r["label"])) for r, _ in zip(csv.DictReader(f), range(limit))]
    if len(rows) < 256:
        raise DataError(f"{table}: {len(rows)} labelled patches; the GPU bench needs at least 256")
    with ThreadPoolExecutor(8) as pool:
        images = np.stack(list(pool.map(read_patch, [data_dir / "train" / f"{i}.tif" for i, _ in rows])))
    return SimpleNamespace(images=images, labels=np.array([y for _, y in rows], dtype=np.int8))


def auc_with_se(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """ROC AUC (Mann-Whitney, ties averaged) and its Hanley-McNeil standard error."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2
    pos, neg = int((labels == 1).sum()), int((labels == 0).sum())
    auc = (ranks[labels == 1].sum() - pos * (pos + 1) / 2) / (pos * neg)
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (pos - 1) * (q1 - auc ** 2) + (neg - 1) * (q2 - auc ** 2)) / (pos * neg)
    return float(auc), float(np.sqrt(max(var, 0.0)))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- measurements --------------------------------------------------------------------------------

def trainer(backbone: str, precision: str, data, device: torch.device, batch: int):
    """A function running one seeded epoch of ``n_batches`` batches, the product's train_one_epoch."""
    from trainables.config import fast_path, resolve_config
    from trainables.engine import SmoothedBCE, make_optimizer, train_one_epoch
    from trainables.models import build_model

    cfg = resolve_config({"backbone": backbone, "pretrained": False, "precision": precision, "batch_size": batch})
    path = fast_path(cfg, device, training=True)
    model = path.prepare_model(build_model(backbone, pretrained=False).to(device))
    crit = SmoothedBCE().to(device)
    opt, sched = make_optimizer(model, cfg, steps_per_epoch=10_000)
    scaler = path.grad_scaler()

    def run(n_batches: int, epoch: int) -> tuple[int, float]:
        """(images trained, seconds): fewer than n_batches * batch when the data is shorter (or ends in a runt)."""
        idx = np.arange(min(len(data.labels), n_batches * batch))
        sync(device)
        t0 = time.perf_counter()
        _, seen = train_one_epoch(model, opt, sched, crit, data, idx, cfg, device, epoch, path, scaler=scaler)
        sync(device)
        return seen, time.perf_counter() - t0
    run(3, 0)  # cuDNN's benchmark picks kernels on the first batches: keep that out of the timing
    return run, path


def m_step(a, data, device, backbone: str) -> dict:
    out = {}
    for precision in ("fp32", a.precision):  # interleaved per repeat: a GPU that heats up affects both alike
        out[precision] = trainer(backbone, precision, data, device, a.batch_size)
    runs = {p: [] for p in out}
    for r in range(a.repeats):
        for p, (run, _) in out.items():
            seen, seconds = run(a.batches, r + 1)
            runs[p].append(seen / seconds)
    return {"fp32": runs["fp32"], "auto": runs[a.precision], "path": out[a.precision][1].name}


def m_infer(a, data, device, backbone: str) -> dict:
    from trainables.config import fast_path, resolve_config
    from trainables.engine import predict_views
    from trainables.models import build_model

    cfg = resolve_config({"backbone": backbone, "pretrained": False})
    n = min(len(data.labels), a.infer_images)
    out = {}
    for precision, key in (("fp32", "fp32"), (a.precision, "auto")):
        path = fast_path({**cfg, "precision": precision}, device, training=False)
        model = build_model(backbone, pretrained=False).to(device)
        predict_views(model, data.images, cfg, np.arange(min(n, 64)), views=tuple(range(8)), path=path)  # warm-up
        ips = []
        for _ in range(a.repeats):
            sync(device)
            t0 = time.perf_counter()
            predict_views(model, data.images, cfg, np.arange(n), views=tuple(range(8)), path=path)
            sync(device)
            ips.append(n / (time.perf_counter() - t0))
        out[key] = ips
    return out


def packed_worker(images_file: str, labels: np.ndarray, backbone: str, precision: str, batch: int, n_batches: int,
                  share: float, device_name: str, barrier, results) -> None:
    """One packed 'trial': capped at its share of the GPU memory, started with the others, timed alone."""
    from trainables.device import claim_device

    device = claim_device(torch.device(device_name), share)
    data = SimpleNamespace(images=np.load(images_file, mmap_mode="r"), labels=labels)
    run, _ = trainer(backbone, precision, data, device, batch)
    barrier.wait()
    t0 = time.time()
    seen, _ = run(n_batches, 1)
    results.put((seen, t0, time.time()))


def m_pack(a, data, device, n_trials: int) -> float:
    """Aggregate images/s of ``n_trials`` processes training side by side on ``device``."""
    import multiprocessing as mp
    import queue

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        images_file = os.path.join(tmp, "images.npy")
        np.save(images_file, data.images)
        barrier, results = ctx.Barrier(n_trials), ctx.Queue()
        procs = [ctx.Process(target=packed_worker, args=(images_file, data.labels, a.pack_backbone, a.precision,
                                                         a.batch_size, a.batches, 1 / n_trials, str(device), barrier, results))
                 for _ in range(n_trials)]
        for p in procs:
            p.start()
        done = []
        try:
            while len(done) < n_trials:
                try:
                    done.append(results.get(timeout=5))
                except queue.Empty:
                    failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                    if failed:  # its traceback is on stderr above; the others would wait at the barrier forever
                        raise UserError(f"a packed trial process ({n_trials} on the GPU) exited with code "
                                        f"{failed[0]}; see its error above (out of memory: try --batch-size 64)")
        finally:
            for p in procs:
                if p.is_alive() and len(done) < n_trials:
                    p.terminate()
                p.join()
    seen = sum(d[0] for d in done)
    return seen / (max(d[2] for d in done) - min(d[1] for d in done))


def m_parity(a, data, device, backbone: str) -> dict:
    """Val AUC (8-view TTA) of fp32 and auto training, same config, seed and split."""
    from trainables.config import fast_path, resolve_config
    from trainables.engine import predict_views
    from trainables.loop import fit

    order = np.random.default_rng(0).permutation(len(data.labels))
    n_val = len(order) // 5
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    out = {}
    for precision, key in (("fp32", "fp32"), (a.precision, "auto")):
        cfg = resolve_config({**PARITY, "backbone": backbone, "precision": precision, "epochs": a.parity_epochs})
        t0 = time.perf_counter()
        model, history = fit(cfg, data, train_idx, device=device)
        probs = predict_views(model, data.images, cfg, val_idx, views=tuple(range(8)),
                              path=fast_path(cfg, device, training=False))
        auc, se = auc_with_se(data.labels[val_idx], probs)
        out[key] = {"auc": auc, "se": se, "seconds": time.perf_counter() - t0, "path": history[-1]["fast_path"],
                          "status": history[-1]["trial_status"]}
    return out


# --- the report ----------------------------------------------------------------------------------

def parity_row(backbone: str, r: dict) -> str:
    """A parity table row; a run that did not complete (diverged) has no AUC to show, only its status."""
    f, t = r["fp32"], r["auto"]
    ok = f["status"] == t["status"] == "completed"

    def auc(x: dict) -> str:
        return f"{x['auc']:.4f} ± {x['se']:.4f}" if x["status"] == "completed" else f"{x['status']}, no AUC"
    return (f"| {backbone} ({t['path']}) | {auc(f)} | {auc(t)} | "
            + (f"{t['auc'] - f['auc']:+.4f}" if ok else "n/a") + " |")


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:,.0f}"
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def ratio(fast: list[float], slow: list[float]) -> str:
    r = [f / s for f, s in zip(fast, slow)]
    return f"{statistics.median(r):.2f}x" + (f" ({min(r):.2f}-{max(r):.2f})" if len(r) > 1 else "")


def header(device: torch.device, data, a) -> str:
    if device.type != "cuda":
        return f"CPU dry run (test only: these figures mean nothing); torch {torch.__version__}"
    p = torch.cuda.get_device_properties(device)
    return (f"GPU: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB; torch "
            f"{torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; "
            f"{len(data.labels):,} real patches from {a.data_dir}; batch {a.batch_size}, 96 px, "
            f"median (min-max) of {a.repeats}")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainables.bench --only gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("gpu",), default="gpu")
    p.add_argument("--data-dir", default=None, help="Kaggle-layout folder of real patches (default ../shared/pcam_sample)")
    p.add_argument("--backbones", default=",".join(BACKBONES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=20, help="training batches per timed epoch")
    p.add_argument("--images", type=int, default=3200, help="labelled patches read from --data-dir")
    p.add_argument("--infer-images", type=int, default=2048)
    p.add_argument("--parity-backbones", default="baseline_bn,resnet18")
    p.add_argument("--parity-epochs", type=int, default=3)
    p.add_argument("--pack", default="1,2,4", help="trials packed on the GPU at once")
    p.add_argument("--pack-backbone", default="resnet18")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16"), default="auto",
                   help="what is compared with fp32 (default auto: this GPU's choice, docs/training.md)")
    p.add_argument("--cpu-dry-run", action="store_true", help=argparse.SUPPRESS)
    return p


def run(argv=None) -> None:
    from trainables.device import claim_device, cuda_device_count

    a = get_args_parser().parse_args(argv)
    if not a.cpu_dry_run and not cuda_device_count():
        raise UserError(f"the GPU bench needs a CUDA GPU and torch sees none here (torch {torch.__version__}, CUDA "
                        f"build {torch.version.cuda or 'none'}); run it on a GPU machine, or `python -m "
                        f"trainables.bench` for the CPU figures")
    if min(a.repeats, a.batch_size, a.batches, a.images, a.infer_images, a.parity_epochs) < 1:
        raise UserError("--repeats, --batch-size, --batches, --images, --infer-images, --parity-epochs: at least 1")
    # Claimed as a trial's device is (cudnn.benchmark on): the step and inference figures are the product's.
    device = torch.device("cpu") if a.cpu_dry_run else claim_device(torch.device("cuda", 0))
    a.data_dir = Path(a.data_dir) if a.data_dir else SHARED_SAMPLE
    data = load_patches(a.data_dir, a.images)
    backbones = [b for b in a.backbones.split(",") if b]
    print(header(device, data, a), flush=True)
    q = a.precision
    print(f"\n| backbone | train img/s fp32 | train img/s {q} | {q} is | speed-up | TTA infer img/s fp32 "
          f"| TTA infer img/s {q} | speed-up |\n|---|---|---|---|---|---|---|---|", flush=True)
    for b in backbones:
        s, i = m_step(a, data, device, b), m_infer(a, data, device, b)
        print(f"| {b} | {spread(s['fp32'])} | {spread(s['auto'])} | {s['path']} | {ratio(s['auto'], s['fp32'])} "
              f"| {spread(i['fp32'])} | {spread(i['auto'])} | {ratio(i['auto'], i['fp32'])} |", flush=True)
    packs = [int(n) for n in a.pack.split(",") if n]
    print(f"\n| {a.pack_backbone} trials on one GPU ({q}, each capped at 1/N of its memory) | aggregate train img/s "
          f"| vs 1 |\n|---|---|---|", flush=True)
    agg = {}
    for n in packs:
        agg[n] = [m_pack(a, data, device, n) for _ in range(a.repeats)]
        print(f"| {n} | {spread(agg[n])} | {ratio(agg[n], agg[packs[0]])} |", flush=True)
    print(f"\n| parity ({a.parity_epochs} epochs, seed 0, {len(data.labels) // 5:,} held-out real patches, 8-view TTA) "
          f"| val AUC fp32 | val AUC {q} | {q} - fp32 |\n|---|---|---|---|", flush=True)
    for b in [b for b in a.parity_backbones.split(",") if b]:
        print(parity_row(b, m_parity(a, data, device, b)), flush=True)
