"""trainables.bench (the CLI) and its section modules: the figures it prints say what they are (median, min-max, CPU flags, path used)."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest

from trainables import bench, bench_figures


def test_spread_is_median_with_min_max():
    assert bench_figures.spread([3.0, 1.0, 2.0]) == "2 (1-3)"
    assert bench_figures.spread([1.5], "{:.2f}") == "1.50"


def test_ratios_are_taken_per_repeat():
    r = {"a": [{"ips": 10}, {"ips": 30}], "b": [{"ips": 5}, {"ips": 10}]}
    assert bench_figures.ratios(r, "a", "b") == [2.0, 3.0]


@pytest.mark.parametrize("argv, match", [
    (["--only", "data,cuda"], "--only data,cuda: unknown section"),
    (["--only", "data,gpu"], "--only data,gpu: gpu runs alone"),
    (["--repeats", "0"], "must be at least 1"),
])
def test_bad_options_name_the_option(argv, match, capsys):
    assert bench.main(argv) == 2
    assert re.search(match, capsys.readouterr().err)


@pytest.mark.slow
def test_bench_prints_medians_paths_and_cpu_flags(pcam_sample_dir, tmp_path, capsys):
    """A tiny real run on the real patches: each measurement in its own process, both sides of each ratio."""
    bench.main(["--data-dir", str(pcam_sample_dir), "--cache-dir", str(tmp_path), "--only", "data,infer",
                "--repeats", "2", "--images", "128", "--infer-images", "16"])
    out = capsys.readouterr().out
    assert "CPU: " in out and "native bf16" in out
    assert re.search(r"ours / notebook\s+[\d.]+ \([\d.]+-[\d.]+\) x", out)
    assert re.search(r"--precision auto .*img/s\s+\[(bf16|fp32) channels_last, batch 64\]", out)
    assert "auto / previous" in out


# --- the GPU section (trainables.bench_gpu): this machine has no GPU -----------------------------------

FORBIDDEN = ("ray", "mlflow", "optuna", "numba", "pandas", "sklearn")  # not in a stock PyTorch container


def test_gpu_bench_refuses_in_one_line_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr("trainables.device.cuda_device_count", lambda: 0)
    assert bench.main(["--only", "gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the GPU bench needs a CUDA GPU") and "\n" not in err


def test_gpu_bench_imports_only_torch_torchvision_numpy():
    """Importing the bench and the training code it runs (engine, loop, models) pulls in none of the rest."""
    import subprocess
    import sys

    code = ("import sys; import trainables.bench, trainables.bench_gpu, trainables.engine, trainables.loop, "
            "trainables.models, trainables.device, datasets.images; "
            f"print(sorted(m for m in {FORBIDDEN!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_auc_and_its_standard_error_match_the_references():
    from sklearn.metrics import roc_auc_score

    from trainables.bench_gpu import auc_with_se

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    scores = np.round(labels * 0.3 + rng.random(500), 1)  # many ties
    auc, se = auc_with_se(labels, scores)
    assert auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    pos, neg = labels.sum(), (1 - labels).sum()
    assert 0.5 / np.sqrt(min(pos, neg)) > se > 0.1 / np.sqrt(min(pos, neg))  # Hanley-McNeil's order of magnitude


@pytest.mark.slow
def test_gpu_bench_runs_its_sections_on_the_cpu_without_the_rest_installed(tmp_path):
    """The whole GPU bench, tiny, on the CPU (--cpu-dry-run), with Ray, MLflow, Optuna, pandas and scikit-learn
    made unimportable: every section runs and prints its table (numba: only the CPU data path needs it)."""
    import subprocess
    import sys

    from test_trainables_train import write_toy_kaggle

    data = write_toy_kaggle(tmp_path / "data", n=256)
    blocked = [m for m in FORBIDDEN if m != "numba"]
    code = (f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); from trainables import bench; "
            f"sys.exit(bench.main(sys.argv[1:]))")
    args = ["--only", "gpu", "--cpu-dry-run", "--data-dir", str(data), "--backbones", "baseline_bn", "--repeats", "1",
            "--batch-size", "16", "--batches", "2", "--infer-images", "32", "--parity-backbones", "baseline_bn",
            "--parity-epochs", "1", "--pack", "1,2", "--pack-backbone", "baseline_bn"]
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("CPU dry run (test only")
    assert any(re.match(r"\| baseline_bn \| [\d,]+ \| [\d,]+ \| \w+ channels_last \| [\d.]+x \|", ln) for ln in lines)
    assert any(re.match(r"\| 2 \| [\d,]+ \| [\d.]+x \|", ln) for ln in lines)
    assert any(re.match(r"\| baseline_bn \(\w+ channels_last\) \| 0\.\d{4} ± 0\.\d{4} \|", ln)
               or "| 1.0000 ± 0.0000 |" in ln for ln in lines)


def test_gpu_bench_claims_its_gpu_as_a_trial_does(monkeypatch):
    """The step and inference figures run with the product's GPU settings (cudnn.benchmark on), not torch's
    defaults. CUDA's presence is faked; the bench stops where it would read the patches."""
    import torch

    from trainables import bench_gpu

    class Stop(Exception):
        pass

    def stop(*args):
        raise Stop
    monkeypatch.setattr("trainables.device.cuda_device_count", lambda: 1)
    monkeypatch.setattr(bench_gpu, "load_patches", stop)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with pytest.raises(Stop):
        bench_gpu.run(["--only", "gpu"])
    assert torch.backends.cudnn.benchmark is True


def test_a_packed_trial_counts_the_images_it_trained(tmp_path):
    """40 patches, asked for 5 batches of 16: the trial trains 40 images (2 batches and a runt of 8), and that is
    what its aggregate throughput counts, not 5 x 16."""
    import queue
    import threading

    from trainables.bench_gpu import packed_worker

    rng = np.random.default_rng(0)
    np.save(tmp_path / "images.npy", rng.integers(0, 255, (40, 96, 96, 3), dtype=np.uint8))
    labels = (np.arange(40) % 2).astype(np.int8)
    results = queue.Queue()
    packed_worker(str(tmp_path / "images.npy"), labels, "baseline", "fp32", 16, 5, 1.0, "cpu", threading.Barrier(1),
                  results)
    seen, t0, t1 = results.get_nowait()
    assert seen == 40 and t1 >= t0


def test_a_parity_run_that_diverged_shows_no_auc():
    from trainables.bench_gpu import parity_row

    ok = {"auc": 0.91234, "se": 0.0123, "path": "fp32 NCHW", "status": "completed"}
    fp16 = {"auc": 0.5, "se": 0.03, "path": "fp16 channels_last", "status": "completed"}
    assert parity_row("resnet18", {"fp32": ok, "auto": fp16}) == \
        "| resnet18 (fp16 channels_last) | 0.9123 ± 0.0123 | 0.5000 ± 0.0300 | -0.4123 |"
    diverged = {**fp16, "auc": float("nan"), "status": "diverged"}
    assert parity_row("resnet18", {"fp32": ok, "auto": diverged}) == \
        "| resnet18 (fp16 channels_last) | 0.9123 ± 0.0123 | diverged, no AUC | n/a |"
