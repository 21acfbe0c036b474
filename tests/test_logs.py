"""Logs a user can read: progress bars only on a terminal (a redirected bar is one line of thousands of characters),
a plain line per epoch otherwise, and no live-table column contradicting Ray's own status."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from datasets.progress import bar, on_terminal

REPO = Path(__file__).resolve().parents[1]
MAX_LINE = 500


class _Tty(io.StringIO):
    def isatty(self):
        return True


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}


def _longest(path: Path) -> int:
    # tqdm's refreshes end in \r, not \n: count them as one line, as a file viewer does
    return max(len(line) for line in path.read_text(errors="replace").split("\n"))


def test_bars_draw_on_a_terminal_only():
    tty, pipe = _Tty(), io.StringIO()
    assert on_terminal(tty) and not on_terminal(pipe)
    for stream in (tty, pipe):
        for _ in bar(range(50), file=stream, desc="work", mininterval=0):
            pass
    assert "work" in tty.getvalue() and pipe.getvalue() == ""
    quiet = _Tty()
    for _ in bar(range(5), file=quiet, enabled=False):
        pass
    assert quiet.getvalue() == ""


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from datasets.synthetic import write_kaggle_layout

    out = tmp_path_factory.mktemp("logs") / "pcam"
    write_kaggle_layout(out, n=160, seed=0)
    return out


def test_training_redirected_prints_a_line_per_epoch_and_no_bar(tiny_data, tmp_path):
    """Decoding the data into a fresh cache and 2 epochs, output to a file: short lines, one per epoch."""
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-m", "trainables.train", "--data-dir", str(tiny_data), "--cache-dir",
                        str(tmp_path / "cache"), "--epochs", "2", "--batch-size", "32", "--max-train-samples", "64",
                        "--input-size", "48"], stdout=f, stderr=subprocess.STDOUT, env=_env(), check=True, timeout=300)
    text = log.read_text()
    assert "\r" not in text and _longest(log) <= MAX_LINE, text[-2000:]
    assert [ln.split()[1] for ln in text.splitlines() if ln.startswith("epoch")] == ["1", "2"]


def test_live_table_has_no_column_of_the_trainables_own_status():
    from search.live_table import METRIC_COLUMNS

    assert "trial_status" not in METRIC_COLUMNS and "status" not in METRIC_COLUMNS.values()


@pytest.mark.slow
def test_search_redirected_to_a_file_has_no_line_over_500_characters(tiny_data, tmp_path):
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-m", "search.run", "--space", "smoke", "--name", "logs", "--data-dir",
                        str(tiny_data), "--num-samples", "2", "--max-epochs", "1", "--results-dir",
                        str(tmp_path / "results"), "--cache-dir", str(tmp_path / "cache")],
                       stdout=f, stderr=subprocess.STDOUT, env=_env(), check=True, timeout=600)
    text = log.read_text()
    assert "Leaderboard" in text and _longest(log) <= MAX_LINE, max(text.split("\n"), key=len)[:1000]
    # Ray's table has its own status column (TERMINATED, ...): the trainable's 'running' must not sit beside it.
    header = next(ln for ln in text.splitlines() if "Trial name" in ln)
    assert header.count("status") == 1, header
