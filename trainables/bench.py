"""Throughput of our data path, training step and inference, against the notebooks' pipeline and
against this project's previous code path, side by side.

    python -m trainables.bench [--data-dir DIR] [--repeats 3] [--only data,train,infer] [--threads N]
    python -m trainables.bench --only layouts      # the measurement behind trainables.fastpath's rule
    python -m trainables.bench --only parity       # bf16 vs fp32 val/test AUC, same config and seed
    python -m trainables.bench --only gpu          # the GPU figures: trainables/bench_gpu.py (CUDA only)

Every figure is the median of ``--repeats`` (>= 3 by default) with its min-max. Each measurement runs
in a fresh process (the allocator setting of trainables.fastpath.reuse_freed_memory is process-wide
and one-way, and the previous code path ran without it), and the variants of one figure alternate
within each repeat, so a machine that gets busier or quieter affects them alike; ratios are taken per
repeat. The header prints the CPU's flags, the thread count and the load average before and after.

  data    augmented, normalised 96 px batches: ours vs the notebook pipeline (a PIL-per-sample
          Dataset with torchvision per-image transforms, fed by a DataLoader with worker processes);
  train   data + training step (forward, backward, AdamW), 96 px, baseline_bn and resnet18: the
          notebook, our previous path (fp32 NCHW, glibc's default allocator, augmentation as torch ops,
          PyTorch's default AdamW), --precision fp32 and auto (both with the fused data pass and AdamW);
  infer   mobilenet_v2 8-view TTA scoring: the previous predict_proba (fp32 NCHW, batches of 256,
          per-sample index-map views, no_grad, default allocator) vs --precision fp32 and auto;
  224     the notebook's 224 px upsampling vs ours at 224 px and at native 96 px;
  layouts training step and inference per backbone in fp32/bf16 x NCHW/channels_last;
  parity  fit baseline_bn and mobilenet_v2 in fp32 and in bf16 with the same config and seed.
Default data: ../shared/pcam_sample when present, else the embedded synthetic dataset.

Why one long module: it is a script, not a library layer; each section is a measurement function (run in a
fresh process) plus a report function, and they share the notebook pipeline, the timing and the reporting
helpers above them. Nothing in the product imports it (only its tests do).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from datasets.errors import UserError, run_cli
from trainables.fastpath import FastPath, cpu_summary, reuse_freed_memory

SHARED_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "pcam_sample"
SECTIONS = ("data", "train", "infer", "224", "layouts", "parity")
DEFAULT_SECTIONS = ("data", "train", "infer")


# --- the notebooks' pipeline --------------------------------------------------------------------

class NotebookDataset(torch.utils.data.Dataset):
    """The notebooks' per-sample pipeline: PIL decode + torchvision transforms, one image at a time."""

    def __init__(self, files: list[Path], labels: np.ndarray, size: int):
        from torchvision import transforms as T
        self.files, self.labels = files, labels
        self.tf = T.Compose([
            T.Resize(size),
            T.RandomHorizontalFlip(), T.RandomVerticalFlip(), T.RandomRotation(20),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05),
            T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        with Image.open(self.files[i]) as im:
            x = self.tf(im.convert("RGB"))
        return x, torch.tensor(float(self.labels[i]))


def notebook_batches(ds, batch_size: int, workers: int):
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True)
    yield from loader


# --- our pipeline -------------------------------------------------------------------------------

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))   # the notebook's Normalize


def our_batches(cache, idx: np.ndarray, cfg: dict, device, batch_size: int, path: FastPath,
                normalise=IMAGENET, previous: bool = False):
    """What train_one_epoch feeds a model on ``path``: augmented, normalised batches in its dtype and layout.

    ``previous``: the data path before the fused CPU pass (trainables.augment's torch ops on fp32 NCHW, then
    the normalisation as its own two passes, as the model did it), for the 'before' training figure.
    """
    from trainables.augment import augment_nhwc
    from trainables.train import get_batch, to_input
    order = np.random.default_rng(0).permutation(idx)
    g = torch.Generator().manual_seed(0)
    for s in range(0, len(order) - batch_size + 1, batch_size):
        x_u8, y = get_batch(cache.images, cache.labels, order[s:s + batch_size], device)
        if previous:
            x = augment_nhwc(x_u8, float(cfg["aug_strength"]), g, normalise=normalise)
        else:
            x = to_input(x_u8, cfg, aug=True, g=g, dtype=path.input_dtype, channels_last=path.channels_last,
                         normalise=normalise)
        yield path.prepare_input(x), y


def timed(batches, n_batches: int, step=None, warmup: int = 2) -> float:
    """images/s over ``n_batches`` after ``warmup`` batches (with their step) that are not timed.

    The warm-up keeps one-off costs out of a steady-state rate, on both sides: torch's first calls and
    the allocator's first pages in a fresh process, the notebook DataLoader's worker start-up (whose
    workers then have up to 2 batches each prefetched when the clock starts: a bias in its favour).
    """
    it = iter(batches)
    for _ in range(warmup):
        x, y = next(it)
        if step is not None:
            step(x, y)
    t0, seen = time.perf_counter(), 0
    for i, (x, y) in enumerate(it):
        if step is not None:
            step(x, y)
        seen += len(x)
        if i + 1 == n_batches:
            break
    if seen and torch.cuda.is_available():
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - t0)


def train_step_fn(backbone: str, device, size: int, path: FastPath, previous: bool = False):
    """One training step of ``backbone`` in ``path``'s precision/layout, warmed up once; and the
    normalisation its batches need. ``previous``: with PyTorch's default AdamW (a per-parameter loop on
    a CPU), as this project used before make_optimizer chose the fused kernel."""
    from trainables.models import build_model
    from trainables.train import SmoothedBCE, make_optimizer, model_step, resolve_config
    cfg = resolve_config({"backbone": backbone, "pretrained": False, "input_size": size})
    model = path.prepare_model(build_model(backbone, pretrained=False).to(device).train())
    if previous:
        opt = torch.optim.AdamW(model.parameters(), lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
    else:
        opt, _ = make_optimizer(model, cfg, steps_per_epoch=1000)
    crit = SmoothedBCE()

    def step(x, y):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss, _ = model_step(model, path.prepare_input(x), y, crit, path)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    # oneDNN builds its kernels on the first call: keep that out of the timing (both sides).
    step(torch.rand(8, 3, size, size, device=device), torch.zeros(8, device=device))
    return step, model.input_normalisation()


# --- measurements, each in a fresh process ------------------------------------------------------

def _setup(threads: int, reuse: bool):
    torch.set_num_threads(threads)
    if reuse:
        reuse_freed_memory()


def _open(cache_path: str):
    from datasets.cache import open_cache
    cache = open_cache(cache_path)
    return cache, cache.indices("train")


def _files(cache, idx):
    root = Path(cache.source.get("data_dir") or "")
    return [root / "train" / f"{i}.tif" for i in cache.ids[idx]], cache.labels[idx]


def _path_for(variant: str, backbone: str, device, training: bool = True) -> FastPath:
    """'before' = this project's previous path (fp32 NCHW); 'fp32' / 'auto' = the --precision values."""
    from trainables.fastpath import choose
    if variant == "before":
        return FastPath(device.type, False, False, "previous path")
    return choose(variant, backbone, device, training)


def m_data(cache_path: str, threads: int, side: str, size: int, n_batches: int, batch: int, workers: int) -> dict:
    from trainables.train import pick_device, resolve_config
    _setup(threads, reuse=side == "ours")
    cache, idx = _open(cache_path)
    device = pick_device()
    if side == "ours":
        # The batches baseline_bn's auto path trains on (bf16 where its model runs in bf16, in its layout),
        # normalised as the notebook's are.
        path = _path_for("auto", "baseline_bn", device)
        cfg = resolve_config({"aug_strength": 0.5, "input_size": size})
        return {"ips": timed(our_batches(cache, idx, cfg, device, batch, path), n_batches),
                "path": f"{str(path.input_dtype).removeprefix('torch.')} "
                        f"{'channels_last' if path.channels_last else 'NCHW'} batches"}
    files, labels = _files(cache, idx)
    return {"ips": timed(notebook_batches(NotebookDataset(files, labels, size), batch, workers), n_batches),
            "path": "float32 batches"}


def m_train(cache_path: str, threads: int, side: str, backbone: str, size: int, n_batches: int, batch: int,
            workers: int) -> dict:
    from trainables.train import pick_device, resolve_config
    device = pick_device()
    _setup(threads, reuse=side not in ("before", "notebook"))
    cache, idx = _open(cache_path)
    path = _path_for("before" if side == "notebook" else side, backbone, device)
    step, normalise = train_step_fn(backbone, device, size, path, previous=side in ("before", "notebook"))
    if side == "notebook":
        files, labels = _files(cache, idx)
        ips = timed(notebook_batches(NotebookDataset(files, labels, size), batch, workers), n_batches, step)
    else:
        cfg = resolve_config({"aug_strength": 0.5, "input_size": size})
        ips = timed(our_batches(cache, idx, cfg, device, batch, path, normalise, previous=side == "before"),
                    n_batches, step)
    return {"ips": ips, "path": path.name}


@torch.no_grad()
def previous_predict_views(model, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """predict_proba(tta=True) as it was before issue 10, for the 'before' inference figure."""
    from trainables.augment import dihedral
    out = np.empty(len(images), dtype=np.float32)
    for s in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size]))
        x = x.permute(0, 3, 1, 2).float().div_(255)
        probs = 0
        for k in range(8):
            probs = probs + torch.sigmoid(model(dihedral(x, torch.full((x.shape[0],), k))).float())
        out[s:s + len(x)] = (probs / 8).numpy()
    return out


def m_infer(cache_path: str, threads: int, side: str, backbone: str, n_images: int) -> dict:
    from trainables.models import build_model
    from trainables.train import predict_proba, resolve_config
    _setup(threads, reuse=False)  # predict_proba sets it itself; the previous path ran without
    cache, idx = _open(cache_path)
    images = np.ascontiguousarray(cache.images[np.sort(idx[:n_images])])
    model = build_model(backbone, pretrained=False).eval()   # same compute as trained weights
    cfg = resolve_config({"backbone": backbone, "precision": "fp32" if side == "before" else side})
    if side == "before":
        def run(x):
            return previous_predict_views(model, x)
        path = "fp32 NCHW, batch 256"
    else:
        def run(x):
            return predict_proba(model, x, cfg, tta=True)
        p = _path_for(side, backbone, torch.device("cpu"), training=False)
        path = f"{p.name}, batch {p.inference_batch()}"
    run(images[:64])  # warm-up: oneDNN kernels
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    run(images)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return {"ips": len(images) / wall, "path": path,
            "user": (r1.ru_utime - r0.ru_utime) / len(images) * 1000,
            "sys": (r1.ru_stime - r0.ru_stime) / len(images) * 1000}


def m_layout(threads: int, backbone: str, bf16: bool, channels_last: bool, training: bool, batch: int,
             steps: int) -> dict:
    from trainables.models import build_model
    _setup(threads, reuse=True)
    path = FastPath("cpu", bf16, channels_last)
    x = torch.rand(batch, 3, 96, 96)
    if training:
        step, _ = train_step_fn(backbone, torch.device("cpu"), 96, path)
        y = (torch.rand(batch) > 0.5).float()

        def run():
            step(x, y)
    else:
        model = path.prepare_model(build_model(backbone, pretrained=False).eval())
        xi = path.prepare_input(x)

        def run():
            with torch.inference_mode(), path.autocast():
                model(xi)
    run()
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
        run()
    return {"ips": batch * steps / (time.perf_counter() - t0), "cpu_ips": batch * steps / (time.process_time() - c0)}


def m_parity(cache_path: str, threads: int, backbone: str, precision: str, epochs: int) -> dict:
    from datasets.cache import open_cache
    _setup(threads, reuse=True)
    return parity_run(open_cache(cache_path), backbone, precision, epochs)


def parity_run(cache, backbone: str, precision: str, epochs: int) -> dict:
    """Train PARITY_CONFIGS[backbone] in ``precision``: last-epoch val AUC, and the test AUC (scored in
    fp32 with 8-view TTA, so only the training precision differs) when the data has test labels."""
    from sklearn.metrics import roc_auc_score

    from datasets.splits import train_val_split
    from datasets.test_labels import find_test_labels
    from trainables.train import fit, predict_proba, resolve_config
    cfg = resolve_config({**PARITY_CONFIGS[backbone], "backbone": backbone, "precision": precision, "epochs": epochs})
    train_idx, val_idx = train_val_split(cache, val_fraction=float(cfg["val_fraction"]), seed=int(cfg["seed"]))
    t0 = time.perf_counter()
    model, history = fit(cfg, cache, train_idx, val_idx)
    out = {"val_auc": history[-1]["val_auc"], "seconds": time.perf_counter() - t0, "path": history[-1]["fast_path"],
           "test_auc": None}
    test_idx = cache.indices("test")
    labels, _ = find_test_labels(cache, test_idx, cache.ids[test_idx].astype(str), None) if len(test_idx) else (None, None)
    if labels is not None:
        probs = predict_proba(model, cache.images[test_idx], {**cfg, "precision": "fp32"}, tta=True)
        out["test_auc"] = float(roc_auc_score(labels, probs))
    return out


PARITY_CONFIGS = {
    # The README's real-patch configs (tests/test_trainables_realdata.py), fewer epochs.
    "baseline_bn": {"batch_size": 64, "lr": 2e-3, "aug_strength": 0.5, "dropout": 0.3, "val_fraction": 0.15,
                    "seed": 0},
    "mobilenet_v2": {"pretrained": True, "batch_size": 64, "lr": 5e-4, "aug_strength": 0.5, "dropout": 0.2,
                     "val_fraction": 0.15, "warmup_epochs": 0.3, "seed": 0},
}


def in_fresh_process(fn, *args) -> dict:
    # One process per measurement (max_tasks_per_child=1): a clean allocator and no warmed caches.
    with ProcessPoolExecutor(1, mp_context=get_context("spawn"), max_tasks_per_child=1) as ex:
        return ex.submit(fn, *args).result()


# --- reporting ----------------------------------------------------------------------------------

def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    """median (min-max)"""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def run_variants(repeats: int, variants: dict) -> dict[str, list[dict]]:
    """{name: [result per repeat]}: in each repeat every variant once, in turn."""
    out = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (fn, args) in variants.items():
            out[name].append(in_fresh_process(fn, *args))
    return out


def ratios(results: dict, num: str, den: str) -> list[float]:
    return [a["ips"] / b["ips"] for a, b in zip(results[num], results[den])]


def print_row(label: str, results: list[dict], extra: str = "") -> None:
    path = results[0].get("path")
    print(f"    {label:34s} {spread([r['ips'] for r in results]):>24s} img/s"
          f"{'   [' + path + ']' if path else ''}{extra}", flush=True)


def print_ratio(label: str, values: list[float]) -> None:
    print(f"    {label:34s} {spread(values, '{:.2f}'):>24s} x", flush=True)


# --- sections -----------------------------------------------------------------------------------

def section_data(a, cache_path, n_idx):
    n = max(1, min(a.images, n_idx) // a.batch_size)
    print(f"(a) data delivery: augmented, normalised batches of {a.batch_size}, 96 px, {n} batches")
    r = run_variants(a.repeats, {
        "ours": (m_data, (cache_path, a.threads, "ours", 96, n, a.batch_size, a.workers)),
        "notebook": (m_data, (cache_path, a.threads, "notebook", 96, n, a.batch_size, a.workers)),
    })
    print_row("ours", r["ours"])
    print_row(f"notebook ({a.workers} DataLoader workers)", r["notebook"])
    print_ratio("ours / notebook", ratios(r, "ours", "notebook"))


def section_train(a, cache_path):
    print(f"(b) data + training step, 96 px, batch {a.batch_size}, {a.train_batches} batches after a warm-up step")
    for backbone in ("baseline_bn", "resnet18"):
        args = (cache_path, a.threads)
        tail = (backbone, 96, a.train_batches, a.batch_size, a.workers)
        r = run_variants(a.repeats, {side: (m_train, (*args, side, *tail))
                                     for side in ("notebook", "before", "fp32", "auto")})
        print(f"  {backbone}")
        print_row("notebook pipeline", r["notebook"])
        print_row("ours, previous path", r["before"])
        print_row("ours, --precision fp32", r["fp32"])
        print_row("ours, --precision auto", r["auto"])
        print_ratio("auto / previous path", ratios(r, "auto", "before"))
        print_ratio("auto / fp32", ratios(r, "auto", "fp32"))
        print_ratio("auto / notebook", ratios(r, "auto", "notebook"))


def section_infer(a, cache_path, n_idx):
    n = min(a.infer_images, n_idx)
    print(f"(c) inference: mobilenet_v2, 8-view TTA over {n} patches (img/s = patches/s); CPU ms per patch")
    r = run_variants(a.repeats, {side: (m_infer, (cache_path, a.threads, side, "mobilenet_v2", n))
                                 for side in ("before", "fp32", "auto")})
    for side, label in (("before", "previous predict_proba"), ("fp32", "--precision fp32"), ("auto", "--precision auto")):
        cpu = (f"   user {spread([x['user'] for x in r[side]], '{:.1f}')}"
               f" sys {spread([x['sys'] for x in r[side]], '{:.1f}')} ms")
        print_row(label, r[side], cpu)
    print_ratio("auto / previous", ratios(r, "auto", "before"))
    print_ratio("fp32 / previous", ratios(r, "fp32", "before"))


def section_224(a, cache_path, n_idx):
    n = max(1, min(a.images, n_idx) // a.batch_size // 4)
    print(f"(d) against the notebook's 224 px upsampling ({n} batches of data, {max(1, a.train_batches // 2)} of resnet18)")
    data = run_variants(a.repeats, {
        "ours224": (m_data, (cache_path, a.threads, "ours", 224, n, a.batch_size, a.workers)),
        "ours96": (m_data, (cache_path, a.threads, "ours", 96, n, a.batch_size, a.workers)),
        "notebook": (m_data, (cache_path, a.threads, "notebook", 224, n, a.batch_size, a.workers)),
    })
    print_ratio("data alone: ours 224 px / notebook", ratios(data, "ours224", "notebook"))
    print_ratio("data alone: ours 96 px / notebook 224", ratios(data, "ours96", "notebook"))
    nb = max(1, a.train_batches // 2)
    train = run_variants(a.repeats, {
        "ours224": (m_train, (cache_path, a.threads, "auto", "resnet18", 224, nb, a.batch_size, a.workers)),
        "ours96": (m_train, (cache_path, a.threads, "auto", "resnet18", 96, nb, a.batch_size, a.workers)),
        "notebook": (m_train, (cache_path, a.threads, "notebook", "resnet18", 224, nb, a.batch_size, a.workers)),
    })
    print_ratio("resnet18 training: ours 224 px / notebook", ratios(train, "ours224", "notebook"))
    print_ratio("resnet18 training: ours 96 px / notebook 224", ratios(train, "ours96", "notebook"))


LAYOUT_BACKBONES = ("baseline_bn", "resnet18", "mobilenet_v2", "efficientnet_b0", "mobilenet_v3_large")


def section_layouts(a):
    print(f"(e) precision x layout, batch {a.batch_size}, random images; img/s (wall) and img per CPU-second")
    for training in (True, False):
        for backbone in LAYOUT_BACKBONES:
            combos = {f"{'bf16' if b else 'fp32'} {'channels_last' if c else 'NCHW'}":
                      (m_layout, (a.threads, backbone, b, c, training, a.batch_size, 3))
                      for b in (False, True) for c in (False, True)}
            r = run_variants(a.repeats, combos)
            cells = "  ".join(f"{k}: {spread([x['ips'] for x in v])} ({spread([x['cpu_ips'] for x in v])}/cpu-s)"
                              for k, v in r.items())
            print(f"  {'train' if training else 'infer'} {backbone:18s} {cells}", flush=True)


def section_parity(a, cache_path):
    print(f"(f) AUC parity: the same config and seed trained in fp32 and in bf16 ({a.parity_epochs} epochs; "
          f"test AUC scored in fp32, 8-view TTA)")
    for backbone in ("baseline_bn", "mobilenet_v2"):
        r = {p: in_fresh_process(m_parity, cache_path, a.threads, backbone, p, a.parity_epochs) for p in ("fp32", "bf16")}
        line = "  ".join(f"{p}: val AUC {x['val_auc']:.4f}"
                         + (f", test AUC {x['test_auc']:.4f}" if x["test_auc"] is not None else "")
                         + f" ({x['seconds']:.0f} s, {x['path']})" for p, x in r.items())
        d_val = r["bf16"]["val_auc"] - r["fp32"]["val_auc"]
        d_test = (f", test {r['bf16']['test_auc'] - r['fp32']['test_auc']:+.4f}" if r["fp32"]["test_auc"] is not None else "")
        print(f"  {backbone:13s} {line}   delta AUC bf16 - fp32: val {d_val:+.4f}{d_test}", flush=True)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainables.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="Kaggle-layout folder (default: ../shared/pcam_sample, else synthetic)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--only", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma-separated sections of: {', '.join(SECTIONS)} (default: {','.join(DEFAULT_SECTIONS)}); "
                        f"or gpu alone: the GPU figures (python -m trainables.bench --only gpu --help)")
    p.add_argument("--repeats", type=int, default=3, help="repeats per figure (median, min-max); default 3")
    p.add_argument("--images", type=int, default=2048, help="images per data-only measurement at 96 px")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-batches", type=int, default=4, help="batches per training-step measurement")
    p.add_argument("--infer-images", type=int, default=512, help="patches per inference measurement")
    p.add_argument("--parity-epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=None, help="notebook DataLoader workers (default: CPUs)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of each measurement (default: the CPUs this process may use)")
    return p


def load_data(data_dir: str | None, cache_dir: str | None):
    """The cache of the labelled patches both pipelines read (the notebook's from their .tif files)."""
    from datasets.cache import prepare_dataset
    if data_dir is None and (SHARED_SAMPLE / "train_labels.csv").is_file():
        data_dir = str(SHARED_SAMPLE)
    cache = prepare_dataset(data_dir, cache_dir, progress=True)
    idx = cache.indices("train")
    files, _ = _files(cache, idx[:1])
    if not files or not files[0].is_file():
        raise UserError(f"the benchmark needs a Kaggle-layout folder with train/*.tif; "
                        f"{cache.source.get('data_dir')} has none")
    return cache, idx


@run_cli
def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    only = argparse.ArgumentParser(add_help=False)
    only.add_argument("--only", default="")
    asked = only.parse_known_args(argv)[0].only
    if "gpu" in asked.split(","):
        if asked != "gpu":
            raise UserError(f"--only {asked}: gpu runs alone (its own options: --only gpu --help)")
        # Its own module and options: it must run where only torch, torchvision and numpy are installed.
        from trainables import bench_gpu
        return bench_gpu.run(argv)
    from trainables.train import trial_cpus
    a = get_args_parser().parse_args(argv)
    sections = [s.strip() for s in a.only.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise UserError(f"--only {a.only}: unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    if a.repeats < 1 or a.batch_size < 1 or a.train_batches < 1 or a.infer_images < 1:
        raise UserError("--repeats, --batch-size, --train-batches and --infer-images must be at least 1")
    a.threads = a.threads or trial_cpus()
    a.workers = a.workers if a.workers is not None else trial_cpus()
    cache, idx = load_data(a.data_dir, a.cache_dir)
    cache_path = str(cache.path)
    print(f"trainables.bench: median (min-max) of {a.repeats} repeat(s), each measurement in a fresh process, "
          f"variants alternating within a repeat")
    print(f"CPU: {cpu_summary()}")
    print(f"{a.threads} torch thread(s) per measurement (CPUs this process may use: {trial_cpus()}); "
          f"data {cache.source.get('kind')} ({len(idx):,} train patches); load average 1/5/15 min {load()}", flush=True)
    for s in sections:
        if s == "data":
            section_data(a, cache_path, len(idx))
        elif s == "train":
            section_train(a, cache_path)
        elif s == "infer":
            section_infer(a, cache_path, len(idx))
        elif s == "224":
            section_224(a, cache_path, len(idx))
        elif s == "layouts":
            section_layouts(a)
        elif s == "parity":
            section_parity(a, cache_path)
    print(f"load average 1/5/15 min at the end {load()}")


if __name__ == "__main__":
    sys.exit(main())
