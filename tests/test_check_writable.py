"""datasets.errors.check_writable: an output that cannot be written is one UserError line before any work."""
from __future__ import annotations

import os

import pytest

from datasets.errors import UserError, check_writable


def test_writable_file_and_folder_pass_and_leave_nothing_behind(tmp_path):
    assert check_writable(tmp_path / "out.csv", "--out") == tmp_path / "out.csv"
    assert check_writable(tmp_path / "new" / "deeper", "--results-dir", directory=True).is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]


@pytest.mark.parametrize("path, directory", [("/proc/x.csv", False), ("/proc/pcam-results", True)])
def test_unwritable_places_are_refused_in_one_line(path, directory):
    with pytest.raises(UserError) as e:
        check_writable(path, "--out", directory=directory)
    assert str(e.value).startswith(f"--out {path}: cannot write") and "\n" not in str(e.value)


def test_missing_folders_are_the_writers_to_create_and_a_folder_is_refused(tmp_path):
    assert check_writable(tmp_path / "no" / "such" / "x.csv", "--out") == tmp_path / "no" / "such" / "x.csv"
    assert not (tmp_path / "no").exists()  # nothing created for a file: the writer makes its folders
    (tmp_path / "blocker").write_text("")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_writable(tmp_path / "blocker" / "x.csv", "--out")
    with pytest.raises(UserError, match="is a folder"):
        check_writable(tmp_path, "--out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only folders")
def test_read_only_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(UserError):
        check_writable(ro / "x.csv", "--out")
