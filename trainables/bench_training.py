"""trainables.bench's sections data, train and 224: augmented batches delivered, and the training step fed by
them, ours against the notebooks' pipeline (a PIL-per-sample Dataset with torchvision per-image transforms, fed by
a DataLoader with worker processes) and against this project's previous code path.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trainables.bench_figures import (open_train_rows, path_for, print_ratio, print_row, ratios, run_variants,
                                      setup_process, timed)
from trainables.fastpath import FastPath

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
    return step, model.input_normalization()



def tif_files(cache, idx):
    root = Path(cache.source.get("data_dir") or "")
    return [root / "train" / f"{i}.tif" for i in cache.ids[idx]], cache.labels[idx]



def m_data(cache_path: str, threads: int, side: str, size: int, n_batches: int, batch: int, workers: int) -> dict:
    from trainables.train import pick_device, resolve_config
    setup_process(threads, reuse=side == "ours")
    cache, idx = open_train_rows(cache_path)
    device = pick_device()
    if side == "ours":
        # The batches baseline_bn's auto path trains on (bf16 where its model runs in bf16, in its layout),
        # normalised as the notebook's are.
        path = path_for("auto", "baseline_bn", device)
        cfg = resolve_config({"aug_strength": 0.5, "input_size": size})
        return {"ips": timed(our_batches(cache, idx, cfg, device, batch, path), n_batches),
                "path": f"{str(path.input_dtype).removeprefix('torch.')} "
                        f"{'channels_last' if path.channels_last else 'NCHW'} batches"}
    files, labels = tif_files(cache, idx)
    return {"ips": timed(notebook_batches(NotebookDataset(files, labels, size), batch, workers), n_batches),
            "path": "float32 batches"}


def m_train(cache_path: str, threads: int, side: str, backbone: str, size: int, n_batches: int, batch: int,
            workers: int) -> dict:
    from trainables.train import pick_device, resolve_config
    device = pick_device()
    setup_process(threads, reuse=side not in ("before", "notebook"))
    cache, idx = open_train_rows(cache_path)
    path = path_for("before" if side == "notebook" else side, backbone, device)
    step, normalise = train_step_fn(backbone, device, size, path, previous=side in ("before", "notebook"))
    if side == "notebook":
        files, labels = tif_files(cache, idx)
        ips = timed(notebook_batches(NotebookDataset(files, labels, size), batch, workers), n_batches, step)
    else:
        cfg = resolve_config({"aug_strength": 0.5, "input_size": size})
        ips = timed(our_batches(cache, idx, cfg, device, batch, path, normalise, previous=side == "before"),
                    n_batches, step)
    return {"ips": ips, "path": path.name}



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

