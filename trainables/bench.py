"""Throughput of our data path against the notebooks' PIL-per-sample pipeline, side by side.

    python -m trainables.bench [--data-dir DIR] [--images 2048] [--train-batches 4]

Notebook pipeline (as in the PyTorch notebook solution): a ``Dataset`` that opens each .tif with
PIL and applies torchvision per-image transforms (resize, flips, rotation, colour jitter,
ToTensor, normalise), fed by a ``DataLoader`` with worker processes. Ours: rows fancy-indexed out
of the decode-once uint8 memmap, then float conversion, augmentation (trainables.augment),
resizing and normalisation batch-wise on the training device.

Measured, each as images/s of both pipelines and their ratio:
  (a) data delivery alone: augmented, normalised batches ready for the model (96 px);
  (b) data + one training step (forward, backward, AdamW) for baseline_bn and resnet18 at 96 px;
  (c) against the notebook's 224 px upsampling (data alone, resnet18 training): ours also at 224 px
      (like for like), and ours at native 96 px (what pcam-tune trains at by default).
Default data: ../shared/pcam_sample when present, else the embedded synthetic dataset.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from datasets.errors import UserError, run_cli
from trainables.models import build_model
from trainables.train import (SmoothedBCE, fast_path, get_batch, make_optimizer, model_step, pick_device,
                              resolve_config, to_input, trial_cpus)

SHARED_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "pcam_sample"


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
    for x, y in loader:
        yield x, y


def our_batches(cache, idx: np.ndarray, cfg: dict, device, batch_size: int, normalise: bool):
    order = np.random.default_rng(0).permutation(idx)
    g = torch.Generator(device=device).manual_seed(0)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    for s in range(0, len(order) - batch_size + 1, batch_size):
        x_u8, y = get_batch(cache.images, cache.labels, order[s:s + batch_size], device)
        x = to_input(x_u8, cfg, aug=True, g=g)
        # For training the model normalises inside its forward (PcamNet); for the data-only
        # figure do it here so both pipelines deliver the same thing.
        yield ((x - mean) / std if normalise else x), y


def timed(batches, n_batches: int, step=None) -> float:
    """images/s over ``n_batches`` (worker start-up included: every notebook epoch pays it)."""
    t0, seen = time.perf_counter(), 0
    for i, (x, y) in enumerate(batches):
        if step is not None:
            step(x, y)
        seen += len(x)
        if i + 1 == n_batches:
            break
    if seen and torch.cuda.is_available():
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - t0)


def train_step_fn(backbone: str, device, size: int):
    cfg = resolve_config({"backbone": backbone, "pretrained": False, "input_size": size})
    path = fast_path(cfg, device, training=True)
    model = path.prepare_model(build_model(backbone, pretrained=False).to(device).train())
    opt, _ = make_optimizer(model, cfg, steps_per_epoch=1000)
    crit = SmoothedBCE()

    def step(x, y):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss, _ = model_step(model, path.prepare_input(x), y, crit, path)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def load_data(data_dir: str | None, cache_dir: str | None):
    """(cache, tif files, labels) for the same labelled patches, for both pipelines."""
    from datasets.cache import prepare_dataset
    if data_dir is None and (SHARED_SAMPLE / "train_labels.csv").is_file():
        data_dir = str(SHARED_SAMPLE)
    cache = prepare_dataset(data_dir, cache_dir, progress=True)
    root = Path(cache.source.get("data_dir") or "")
    idx = cache.indices("train")
    files = [root / "train" / f"{i}.tif" for i in cache.ids[idx]]
    if not files or not files[0].is_file():
        raise UserError(f"the benchmark needs a Kaggle-layout folder with train/*.tif; {root} has none")
    return cache, idx, files, cache.labels[idx]


def compare(name: str, ours: float, nb: float) -> None:
    print(f"  {name:44s} ours {ours:9.1f} img/s   notebook {nb:8.1f} img/s   ratio {ours / nb:6.1f}x", flush=True)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainables.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="Kaggle-layout folder (default: ../shared/pcam_sample, else synthetic)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--images", type=int, default=2048, help="images per data-only measurement at 96 px")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-batches", type=int, default=4, help="batches per training-step measurement")
    p.add_argument("--workers", type=int, default=None, help="notebook DataLoader workers (default: CPUs)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the main process (default: the CPUs it may use); on a machine shared "
                        "with other jobs, 1 avoids OpenMP threads waiting on busy cores")
    p.add_argument("--skip-224", action="store_true")
    return p


@run_cli
def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads or trial_cpus())
    device = pick_device()
    workers = args.workers if args.workers is not None else trial_cpus()
    cache, idx, files, labels = load_data(args.data_dir, args.cache_dir)
    bs = args.batch_size
    print(f"device {device} ({torch.get_num_threads()} torch threads), notebook DataLoader workers {workers}, "
          f"data {cache.source.get('kind')} ({len(idx)} train patches), batch {bs}", flush=True)
    cfg = resolve_config({"aug_strength": 0.5})

    def ours(size: int, n_batches: int, step=None) -> float:
        c = {**cfg, "input_size": size}
        return timed(our_batches(cache, idx, c, device, bs, normalise=step is None), n_batches, step)

    def notebook(size: int, n_batches: int, step=None) -> float:
        return timed(notebook_batches(NotebookDataset(files, labels, size), bs, workers), n_batches, step)

    n_data = max(1, min(args.images, len(idx)) // bs)
    print("(a) data delivery alone (augmented, normalised batches)")
    data96 = ours(96, n_data)
    compare("96 px", data96, notebook(96, n_data))
    print("(b) data + training step, 96 px")
    train96 = {}
    for backbone in ("baseline_bn", "resnet18"):
        train96[backbone] = ours(96, args.train_batches, train_step_fn(backbone, device, 96))
        compare(backbone, train96[backbone], notebook(96, args.train_batches, train_step_fn(backbone, device, 96)))
    if args.skip_224:
        return
    print("(c) against the notebook's 224 px upsampling")
    nb_data224 = notebook(224, max(1, n_data // 4))
    compare("data alone: ours 224 px", ours(224, max(1, n_data // 4)), nb_data224)
    compare("data alone: ours native 96 px", data96, nb_data224)
    n224 = max(1, args.train_batches // 2)
    nb_train224 = notebook(224, n224, train_step_fn("resnet18", device, 224))
    compare("resnet18 training: ours 224 px", ours(224, n224, train_step_fn("resnet18", device, 224)), nb_train224)
    compare("resnet18 training: ours native 96 px", train96["resnet18"], nb_train224)


if __name__ == "__main__":
    sys.exit(main())
