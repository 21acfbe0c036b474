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

One module a section, named for what it measures: trainables.bench_training (data, train, 224),
trainables.bench_inference (infer), trainables.bench_layouts (layouts), trainables.bench_parity (parity);
trainables.bench_figures takes and prints every figure (fresh processes, repeats, median and min-max, ratios).
This module is the command line. Nothing in the product imports them (only their tests do).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from datasets.errors import UserError, run_cli
from trainables.bench_figures import load
from trainables.fastpath import cpu_summary

SHARED_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "pcam_sample"
SECTIONS = ("data", "train", "infer", "224", "layouts", "parity")
DEFAULT_SECTIONS = ("data", "train", "infer")


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
    from trainables.bench_training import tif_files
    if data_dir is None and (SHARED_SAMPLE / "train_labels.csv").is_file():
        data_dir = str(SHARED_SAMPLE)
    cache = prepare_dataset(data_dir, cache_dir, progress=True)
    idx = cache.indices("train")
    files, _ = tif_files(cache, idx[:1])
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
    from trainables.bench_inference import section_infer
    from trainables.bench_layouts import section_layouts
    from trainables.bench_parity import section_parity
    from trainables.bench_training import section_224, section_data, section_train
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
