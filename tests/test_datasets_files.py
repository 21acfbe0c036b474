"""datasets.files: the one way the product publishes a file (temporary beside it, renamed over it)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datasets.errors import UserError
from datasets.files import TMP_MARK, atomic_path, atomic_write, clean_stale_temps, temp_path, write_atomically

REPO = Path(__file__).resolve().parents[1]

# Writes half of the new content through atomic_write, says so, then waits to be killed.
KILLED_WRITER = """
import sys, time
from datasets.files import atomic_write
with atomic_write(sys.argv[1]) as f:
    f.write("new, half")
    f.flush()
    print("written", flush=True)
    time.sleep(60)
    f.write(" and the rest")
"""


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TMP_MARK in p.name)


def test_the_one_temporary_name_is_beside_the_file_and_carries_the_pid(tmp_path):
    assert temp_path(tmp_path / "model.pt") == tmp_path / f".model.pt{TMP_MARK}{os.getpid()}"


def test_a_write_publishes_the_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "new" / "folder" / "best_config.json"
    assert write_atomically(target, '{"a": 1}\n') == target
    assert target.read_text() == '{"a": 1}\n' and temps(target.parent) == []
    write_atomically(target, b"\x00bytes")
    assert target.read_bytes() == b"\x00bytes"


def test_a_failing_writer_leaves_the_previous_file_whole(tmp_path):
    target = tmp_path / "submission.csv"
    target.write_text("id,label\nold,0.5\n")
    with pytest.raises(ValueError):
        with atomic_write(target) as f:
            f.write("id,label\nnew,")
            raise ValueError("the model crashed half-way")
    assert target.read_text() == "id,label\nold,0.5\n" and temps(tmp_path) == []
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "model.pt") as tmp:  # a writer that takes a path (torch.save, pandas)
            tmp.write_bytes(b"half")
            raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.csv"]


def test_a_killed_writers_temporary_is_cleaned_and_the_target_never_half_written(tmp_path):
    target = tmp_path / "leaderboard.csv"
    target.write_text("old, complete")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], cwd=REPO, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, text=True)
    assert proc.stdout.readline().strip() == "written"
    live = tmp_path / f".{target.name}{TMP_MARK}{proc.pid}"
    assert live.read_text() == "new, half" and target.read_text() == "old, complete"
    assert clean_stale_temps(tmp_path) == [] and live.exists()  # a live writer's temporary is its own
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert target.read_text() == "old, complete"  # a reader never saw the half
    mine = temp_path(tmp_path / "other.csv")
    mine.write_text("this process is writing it")
    assert clean_stale_temps(tmp_path) == [live]  # the dead writer's goes, this live process's stays
    assert temps(tmp_path) == [mine.name]


def test_clean_up_takes_one_name_or_all_and_removes_a_killed_folder_build(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    time.sleep(0.05)
    folder_build = tmp_path / f".cache-abc{TMP_MARK}{dead}"
    (folder_build / "part").mkdir(parents=True)
    other = tmp_path / f".model.pt{TMP_MARK}{dead}"
    other.write_bytes(b"half")
    assert clean_stale_temps(tmp_path, "model.pt") == [other]
    assert clean_stale_temps(tmp_path) == [folder_build] and temps(tmp_path) == []


@pytest.mark.parametrize("target", ["/sys/pcam-tune-x.json", "/proc/pcam-tune-x.json", "/proc/pcam-tune/x.json"])
def test_an_unwritable_folder_is_one_line_naming_the_file(target):
    def through_a_path():
        with atomic_path(target) as tmp:
            tmp.write_text("x")

    for write in (lambda: write_atomically(target, "x"), through_a_path):
        with pytest.raises(UserError) as e:
            write()
        line = str(e.value)
        assert "\n" not in line and line.startswith(f"cannot write {target}:") and "writable folder" in line
    assert not Path(target).exists()


def test_write_modes_are_whole_files_only(tmp_path):
    with pytest.raises(ValueError, match="whole file"):
        with atomic_write(tmp_path / "log.txt", "a"):
            pass
