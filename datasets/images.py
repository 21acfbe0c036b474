"""Decoding and checking single patches: the only place that opens image files.

Everything downstream reads the decode-once cache; this module is used to build it (and by
``search.predict`` to score a folder of new patches), so its checks are the dataset's checks.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from datasets.defaults import usable_cpus
from datasets.errors import DataError

SIZE = 96
# Modes PIL converts to RGB without guessing (16-bit and float images would need a scaling we won't guess).
_RGB_CONVERTIBLE = {"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1"}


def read_patch(path: str | os.PathLike) -> np.ndarray:
    """One 96x96 RGB patch as a (96, 96, 3) uint8 array, or a one-line DataError saying what is wrong."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.size != (SIZE, SIZE):
                raise DataError(f"{path}: image is {im.size[0]}x{im.size[1]} px, expected 96x96 PCam patches; "
                                f"crop/resize it to 96x96 or leave it out")
            if im.mode not in _RGB_CONVERTIBLE:
                raise DataError(f"{path}: image mode {im.mode!r} cannot be converted to RGB; "
                                f"save it as 8-bit RGB or leave it out")
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: image file is missing; restore it or leave it out (remove its csv row)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable or corrupt image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); "
                        f"re-download it or leave it out (remove its csv row)") from None
    return arr


def decode_workers() -> int:
    # Decoding a 27 KB tif is part I/O, part zlib-free memcpy: threads overlap the I/O and PIL drops the GIL.
    return max(2, min(16, 2 * usable_cpus()))


def read_patches_into(out: np.ndarray, paths: Sequence[str | os.PathLike], progress: bool = True,
                      desc: str = "decode") -> None:
    """Decode ``paths`` in parallel into ``out`` (len(paths), 96, 96, 3), e.g. a memmap being built."""
    from datasets.progress import bar as progress_bar

    def one(i: int) -> None:
        out[i] = read_patch(paths[i])

    with ThreadPoolExecutor(decode_workers()) as pool, \
            progress_bar(total=len(paths), desc=desc, unit="img", enabled=progress, leave=False) as bar:
        # map() re-raises the first DataError in order, so the message names the first bad file.
        for _ in pool.map(one, range(len(paths)), chunksize=64):
            bar.update()


def read_patches(images_dir: str | os.PathLike, ids: Sequence[str], progress: bool = True) -> np.ndarray:
    """Decode ``<images_dir>/<id>.tif`` for each id into a new (N, 96, 96, 3) uint8 array."""
    out = np.empty((len(ids), SIZE, SIZE, 3), np.uint8)
    read_patches_into(out, [Path(images_dir) / f"{i}.tif" for i in ids], progress=progress)
    return out
