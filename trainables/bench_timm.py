"""A timm backbone's training step in fp32 against bf16 autocast + channels_last, side by side in one process:
the measurement behind the precision rule for timm models (docs/training.md).

    python -m trainables.bench_timm [--backbone timm/vit_tiny_patch16_224] [--threads 1] [--repeats 3]

Random weights (no download), full fine-tune, a batch of 96 px patches (resized inside the network when the
model has a fixed input size), AdamW. Prints images/s per precision (median, min-max over the repeats) and the
bf16/fp32 ratio of each repeat's pair.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from datasets.errors import run_cli
from trainables.fastpath import choose, cpu_summary
from trainables.models import build_model


def step_rate(backbone: str, precision: str, batch: int, steps: int) -> float:
    """Images per second of ``steps`` training steps (after one warm-up step)."""
    path = choose(precision, backbone, "cpu", training=True)
    torch.manual_seed(0)
    model = path.prepare_model(build_model(backbone, pretrained=False, unfreeze_depth=None))
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    x = path.prepare_input(torch.rand(batch, 3, 96, 96).to(path.input_dtype))
    y = torch.randint(0, 2, (batch,)).float()

    def step():
        with path.autocast():
            out = model(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0)


@run_cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainables.bench_timm", description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="timm/vit_tiny_patch16_224")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{args.backbone}, {args.threads} thread(s), batch {args.batch_size}; {cpu_summary()}", flush=True)
    rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits both alike
        for precision in rates:
            rates[precision].append(step_rate(args.backbone, precision, args.batch_size, args.steps))
    for precision, r in rates.items():
        print(f"{precision}: {statistics.median(r):.1f} images/s (min {min(r):.1f}, max {max(r):.1f})")
    ratios = [b / a for a, b in zip(rates["fp32"], rates["bf16"])]
    print(f"bf16 / fp32: {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
