"""trainables.bench's section infer: mobilenet_v2 8-view TTA scoring, the previous predict_proba (fp32 NCHW, batches
of 256, per-sample index-map views, no_grad, default allocator) against --precision fp32 and auto.
"""
from __future__ import annotations

import resource
import time

import numpy as np
import torch

from trainables.bench_figures import (open_train_rows, path_for, print_ratio, print_row, ratios, run_variants,
                                      setup_process, spread)


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
    setup_process(threads, reuse=False)  # predict_proba sets it itself; the previous path ran without
    cache, idx = open_train_rows(cache_path)
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
        p = path_for(side, backbone, torch.device("cpu"), training=False)
        path = f"{p.name}, batch {p.inference_batch()}"
    run(images[:64])  # warm-up: oneDNN kernels
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    run(images)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return {"ips": len(images) / wall, "path": path,
            "user": (r1.ru_utime - r0.ru_utime) / len(images) * 1000,
            "sys": (r1.ru_stime - r0.ru_stime) / len(images) * 1000}


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
