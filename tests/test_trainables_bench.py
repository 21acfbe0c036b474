"""trainables.bench: the figures it prints say what they are (median, min-max, CPU flags, path used)."""
from __future__ import annotations

import re

import pytest

from trainables import bench


def test_spread_is_median_with_min_max():
    assert bench.spread([3.0, 1.0, 2.0]) == "2 (1-3)"
    assert bench.spread([1.5], "{:.2f}") == "1.50"


def test_ratios_are_taken_per_repeat():
    r = {"a": [{"ips": 10}, {"ips": 30}], "b": [{"ips": 5}, {"ips": 10}]}
    assert bench.ratios(r, "a", "b") == [2.0, 3.0]


@pytest.mark.parametrize("argv, match", [
    (["--only", "data,gpu"], "--only data,gpu: unknown section"),
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
