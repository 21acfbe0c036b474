"""The refit's version folders: model.pt and submission.csv published together by one atomic symlink swap."""
from __future__ import annotations

import os
import subprocess
import sys

from search.refit import outputs as ro


def _write(version, tag: str) -> None:
    for name in ("model.pt", "submission.csv", "refit.json"):
        (version / name).write_text(f"{tag} {name}")


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def test_publish_switches_every_entry_to_the_new_version_at_once(tmp_path):
    v1 = ro.new_version(tmp_path)
    _write(v1, "v1")
    ro.publish(tmp_path, v1)
    assert (tmp_path / "model.pt").read_text() == "v1 model.pt" and ro.published(tmp_path) == v1.resolve()

    v2 = tmp_path / f"{ro.PREFIX}later-{os.getpid()}"
    v2.mkdir()
    _write(v2, "v2")
    # Until the swap, every entry still reads v1: a kill here leaves the old pair, never a mix.
    assert {(tmp_path / n).read_text() for n in ("model.pt", "submission.csv")} == {"v1 model.pt", "v1 submission.csv"}
    ro.publish(tmp_path, v2)
    assert (tmp_path / "model.pt").read_text() == "v2 model.pt"
    assert (tmp_path / "submission.csv").read_text() == "v2 submission.csv"
    assert not v1.exists()  # the replaced version goes
    assert os.readlink(tmp_path / "submission.csv") == "refit/submission.csv"
    assert not list(tmp_path.glob(".*"))


def test_publish_replaces_the_flat_layout_and_drops_entries_the_new_version_lacks(tmp_path):
    for name in ("model.pt", "submission.csv", "test_roc_curve.png"):
        (tmp_path / name).write_text(f"old {name}")  # written by refits before version folders
    v = ro.new_version(tmp_path)
    (v / "model.pt").write_text("new model")  # e.g. data without a test split: no submission
    ro.publish(tmp_path, v)
    assert (tmp_path / "model.pt").is_symlink() and (tmp_path / "model.pt").read_text() == "new model"
    assert not (tmp_path / "submission.csv").exists() and not (tmp_path / "test_roc_curve.png").exists()


def test_clean_stale_removes_killed_versions_only(tmp_path):
    current = ro.new_version(tmp_path)
    _write(current, "ok")
    ro.publish(tmp_path, current)
    killed = tmp_path / f"{ro.PREFIX}20260101-000000-{_dead_pid()}"
    live = tmp_path / f"{ro.PREFIX}20260101-000001-{os.getppid()}"  # another refit, still writing
    for folder in (killed, live):
        folder.mkdir()
    assert ro.clean_stale(tmp_path) == [killed]
    assert live.is_dir() and current.is_dir() and (tmp_path / "model.pt").read_text() == "ok model.pt"
