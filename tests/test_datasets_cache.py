"""The decode-once cache: reuse by fingerprint, rebuild on change, atomic under SIGKILL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from datasets.cache import open_cache, prepare_dataset
from datasets.errors import DataError
from test_datasets_kaggle import _tif, make_layout

REPO = Path(__file__).resolve().parents[1]


def test_unchanged_source_reuses_cache(tmp_path):
    """The same cache folder comes back (no decoding: test_reuse_does_not_decode; no clock in a unit test)."""
    data = make_layout(tmp_path / "d")
    first = prepare_dataset(data, tmp_path / "c", progress=False)
    again = prepare_dataset(data, tmp_path / "c", progress=False)
    assert again.path == first.path and again.fingerprint == first.fingerprint
    assert isinstance(again.images, np.memmap) and not again.images.flags.writeable


def test_reuse_does_not_decode(tmp_path, monkeypatch):
    data = make_layout(tmp_path / "d")
    prepare_dataset(data, tmp_path / "c", progress=False)
    import datasets.images

    def boom(path):
        raise AssertionError(f"decoded {path} again")
    monkeypatch.setattr(datasets.images, "read_patch", boom)
    prepare_dataset(data, tmp_path / "c", progress=False)


@pytest.mark.parametrize("change", ["label", "image", "new_row"])
def test_changed_source_rebuilds(tmp_path, change):
    data = make_layout(tmp_path / "d")
    first = prepare_dataset(data, tmp_path / "c", progress=False)
    csv = data / "train_labels.csv"
    if change == "label":
        csv.write_text(csv.read_text().replace("tr000,0", "tr000,1"))
    elif change == "image":
        time.sleep(0.01)
        _tif(data / "train" / "tr001.tif", seed=999)
    else:
        _tif(data / "train" / "extra.tif", seed=5)
        csv.write_text(csv.read_text() + "extra,1\n")
    second = prepare_dataset(data, tmp_path / "c", progress=False)
    assert second.fingerprint != first.fingerprint and second.path != first.path
    if change == "label":
        assert second.labels[0] == 1
    if change == "image":
        assert not np.array_equal(second.images[1], first.images[1])


def test_open_cache_in_another_process(tmp_path):
    cache = prepare_dataset(make_layout(tmp_path / "d"), tmp_path / "c", progress=False)
    code = ("import sys, numpy as np; from datasets.cache import open_cache; c = open_cache(sys.argv[1]); "
            "print(c.images.shape, int(c.images[3].sum()), list(c.split).count('test'))")
    r = subprocess.run([sys.executable, "-c", code, str(cache.path)], capture_output=True, text=True, cwd=REPO, check=True)
    assert r.stdout.strip() == f"(16, 96, 96, 3) {int(cache.images[3].sum())} 4"


def test_damaged_cache_is_rejected_and_rebuilt(tmp_path):
    data = make_layout(tmp_path / "d")
    cache = prepare_dataset(data, tmp_path / "c", progress=False)
    with open(cache.path / "images.u8", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(DataError, match="not a complete pcam-tune cache"):
        open_cache(cache.path)
    again = prepare_dataset(data, tmp_path / "c", progress=False)
    assert again.images.shape == (16, 96, 96, 3)


SLOW_BUILD = """
import sys, time
import datasets.images as im
real = im.read_patch
def slow(path):
    time.sleep(0.05)
    return real(path)
im.read_patch = slow
from datasets.cache import prepare_dataset
prepare_dataset(sys.argv[1], sys.argv[2], progress=False)
print("finished")
"""


def test_sigkill_mid_build_leaves_no_usable_cache(tmp_path):
    data = make_layout(tmp_path / "d", n_train=300, n_test=0)
    cache_root = tmp_path / "c"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_BUILD, str(data), str(cache_root)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not list(cache_root.glob(".*.tmp-*/images.u8")):  # the build has started writing pixels
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # nothing complete-looking was left: only the killed build's temp folder
    assert [p.name for p in cache_root.iterdir() if ".tmp-" not in p.name] == []
    cache = prepare_dataset(data, cache_root, progress=False)
    assert cache.images.shape == (300, 96, 96, 3)
    assert int(np.asarray(cache.images[-1]).sum()) > 0  # really decoded, not zeros from a half-written file
    assert not list(cache_root.glob(".*.tmp-*")), "the dead build's temp folder is cleaned up"


def test_cache_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("PCAM_TUNE_CACHE", str(tmp_path / "envcache"))
    cache = prepare_dataset(make_layout(tmp_path / "d"), progress=False)
    assert cache.path.parent == tmp_path / "envcache"
