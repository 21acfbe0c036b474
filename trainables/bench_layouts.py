"""trainables.bench's section layouts: the training step and inference per backbone in fp32/bf16 x NCHW/channels_last
on random images (the measurement behind trainables.fastpath's rule).
"""
from __future__ import annotations

import time

import torch

from trainables.bench_figures import run_variants, setup_process, spread
from trainables.bench_training import train_step_fn
from trainables.fastpath import FastPath


def m_layout(threads: int, backbone: str, bf16: bool, channels_last: bool, training: bool, batch: int,
             steps: int) -> dict:
    from trainables.models import build_model
    setup_process(threads, reuse=True)
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
