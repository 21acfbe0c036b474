"""`python -m search.run` option errors: one line on stderr, exit code 2, before any Ray start."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(args, tmp_path, **env):
    full_env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
                "PCAM_TUNE_RESULTS": str(tmp_path / "results"), "PCAM_TUNE_CACHE": str(tmp_path / "cache"), **env}
    return subprocess.run([sys.executable, "-m", "search.run", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for f in fragments:
        assert f in lines[0]
    assert "starting search" not in proc.stdout  # nothing was launched


@pytest.mark.parametrize("args, fragments", [
    (["--space", "nope"], ["unknown --space 'nope'", "smoke"]),
    (["--space", "backbones", "--backbones", "baseline_bn,resnet1"], ["unknown backbone 'resnet1'"]),
    (["--space", "smoke", "--gpus-per-trial", "4"], ["--gpus-per-trial 4.0", "GPU"]),
    (["--space", "smoke", "--time-budget=-10m"], ["--time-budget '-10m' is negative"]),
    (["--space", "smoke", "--max-epochs", "two"], ["--max-epochs: invalid int value: 'two'"]),
    (["--space", "smoke", "--num-samples", "-1"], ["--num-samples -1 must be more than zero"]),
    (["--space", "smoke", "--resume", "--name", "never-ran"], ["nothing to resume", "never-ran"]),
])
def test_bad_options_fail_in_one_line(args, fragments, tmp_path):
    if args[-1] == "4" and "--gpus-per-trial" in args:
        import torch

        if torch.cuda.device_count() >= 4:
            pytest.skip("this machine has 4 GPUs")
    assert_one_line_error(run_cli(args, tmp_path), *fragments)


def test_missing_pretrained_weights_are_listed_with_the_ways_out(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on: the download fails at once, as offline
        s.bind(("127.0.0.1", 0))
        mirror = f"http://127.0.0.1:{s.getsockname()[1]}/models"
    proc = run_cli(["--space", "backbones", "--backbones", "baseline_bn,resnet18,mobilenet_v2"], tmp_path,
                   TORCH_HOME=str(tmp_path / "torch"), PCAM_TUNE_WEIGHTS_URL=mirror)
    assert_one_line_error(proc, "resnet18-", "mobilenet_v2-", "python -m trainables.weights import",
                          "--backbones baseline_bn", "--no-pretrained", "the download failed",
                          "resnet18: resnet18-", "mobilenet_v2: mobilenet_v2-")
    assert proc.stderr.count("URLError") == 2  # each backbone with its own reason, not only the first


def test_bad_data_dir_fails_before_ray(tmp_path):
    bad = tmp_path / "data"
    (bad / "train").mkdir(parents=True)
    (bad / "train_labels.csv").write_text("id,label\nabc,1\n")  # an id with no image
    proc = run_cli(["--space", "smoke", "--data-dir", str(bad)], tmp_path)
    assert_one_line_error(proc, str(bad))


def test_leaderboard_rows_is_the_option_and_top_k_its_old_name_with_a_warning(capsys):
    """--top-k is the refit's ensemble size; search.run's leaderboard rows are --leaderboard-rows (--top-k warned)."""
    from search import report
    from search.refit.best import get_args_parser as refit_parser
    from search.run import get_args_parser

    assert get_args_parser().parse_args([]).leaderboard_rows == report.TOP_K
    assert get_args_parser().parse_args(["--leaderboard-rows", "3"]).leaderboard_rows == 3
    assert capsys.readouterr().err == ""
    assert get_args_parser().parse_args(["--top-k", "4"]).leaderboard_rows == 4
    assert capsys.readouterr().err.splitlines() == ["warning: --top-k is deprecated for this command, use "
                                                    "--leaderboard-rows 4"]
    assert "--top-k" not in get_args_parser().format_help() and "--leaderboard-rows" in get_args_parser().format_help()
    assert refit_parser().parse_args(["--top-k", "3"]).top_k == 3  # the refit's --top-k K keeps its meaning
    assert capsys.readouterr().err == ""
