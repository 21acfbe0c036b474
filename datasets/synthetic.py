"""Embedded synthetic PCam: H&E-like 96x96 patches with the PCam label rule, written in the Kaggle layout.

This is the default dataset when the user gives no data dir, so the product runs end to end on a fresh
machine. It is built to be *learnable but not trivial*:

- colours come from a Beer-Lambert mix of hematoxylin (nuclei, blue-purple) and eosin (stroma, pink)
  optical densities, and each pseudo-slide gets its own stain vectors and intensity (stain variation);
- normal tissue carries small dark lymphocyte-like nuclei and elongated stromal nuclei; tumour cells are
  larger, paler, irregular nuclei with a nucleolus, growing in clusters; some normal patches carry large
  pale "histiocyte" nuclei as confounders;
- the label is PCam's: 1 iff tumour-cell pixels (the generator's own tumour mask) fall inside the centre
  32x32; a large share of negatives carry tumour cells only in the outer ring, often within a few pixels of
  the centre square, so a model must localise rather than merely detect.

Everything is vectorised over the batch (nuclei are stamped through index arrays), so 2,000 patches take
seconds. ``python -m datasets.synthetic --out DIR --n 2000 --seed 0`` writes the layout.

Why one module of ~300 lines: the generator's parts (stains, nuclei, tissue, the label rule) are tuned together
to keep the data learnable but not trivial; apart they would read as independent knobs.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasets.errors import UserError, run_cli
from datasets.files import clean_stale_temps, temp_path

SIZE = 96
CENTRE = slice(32, 64)  # PCam: the label looks at the centre 32x32 only
GENERATOR_VERSION = 1  # bump when the pictures change, so cached copies are regenerated

# Reference optical densities (Ruifrok & Johnston) of hematoxylin and eosin, per RGB channel.
_H_OD = np.array([0.65, 0.70, 0.29], np.float32)
_E_OD = np.array([0.07, 0.99, 0.11], np.float32)

_WIN = 15  # nucleus stamp window (px); fits the largest tumour nucleus (semi-axis <= 7)
_HALF = _WIN // 2


@dataclass
class SyntheticPatches:
    images: np.ndarray  # (N, 96, 96, 3) uint8
    labels: np.ndarray  # (N,) int8, 1 iff tumour_masks has a pixel in the centre 32x32
    tumour_masks: np.ndarray  # (N, 96, 96) bool, pixels of tumour-cell nuclei
    slides: np.ndarray  # (N,) int, pseudo-slide of each patch


def _upsample(low: np.ndarray) -> np.ndarray:
    """Bilinear upsampling of a (B, r, r) field to (B, 96, 96) as two small matrix products."""
    r = low.shape[-1]
    pos = (np.arange(SIZE) + 0.5) * r / SIZE - 0.5
    i0 = np.clip(np.floor(pos).astype(int), 0, r - 1)
    i1 = np.clip(i0 + 1, 0, r - 1)
    w = (pos - np.floor(pos)).astype(np.float32)
    m = np.zeros((SIZE, r), np.float32)
    m[np.arange(SIZE), i0] += 1 - w
    m[np.arange(SIZE), i1] += w
    return np.einsum("ij,bjk,lk->bil", m, low.astype(np.float32), m, optimize=True)


def _stamp(canvas: np.ndarray, patch: np.ndarray, cy, cx, a, b, theta, strength, profile: str) -> None:
    """Draw elliptic nuclei into ``canvas`` (B, 96, 96) with a max-blend, all nuclei at once.

    Each argument after ``patch`` is a 1-D array over nuclei; ``patch`` gives the image each nucleus
    belongs to. ``profile`` 'dense' gives dark homogeneous chromatin, 'vesicular' a pale rim-stained
    nucleus with a dark nucleolus (the tumour-cell look).
    """
    if len(patch) == 0:
        return
    off = np.arange(-_HALF, _HALF + 1, dtype=np.float32)
    iy = np.floor(cy).astype(np.int64)[:, None, None] + off.astype(np.int64)[None, :, None]
    ix = np.floor(cx).astype(np.int64)[:, None, None] + off.astype(np.int64)[None, None, :]
    dy = iy - cy[:, None, None]
    dx = ix - cx[:, None, None]
    c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    u = (dx * c + dy * s) / a[:, None, None]
    v = (-dx * s + dy * c) / b[:, None, None]
    d = np.sqrt(u * u + v * v)
    edge = np.clip((1.0 - d) * 3.0, 0.0, 1.0)  # soft ~1/3-radius edge
    if profile == "vesicular":
        # chromatin on the membrane, clear inside, a nucleolus near the middle
        body = 0.55 + 0.45 * np.clip((d - 0.45) * 2.5, 0.0, 1.0) + 0.7 * np.exp(-(d / 0.22) ** 2)
    else:
        body = np.ones_like(d)
    val = (edge * body * strength[:, None, None]).astype(np.float32)
    ok = (iy >= 0) & (iy < SIZE) & (ix >= 0) & (ix < SIZE) & (val > 0)
    flat = (np.broadcast_to(patch[:, None, None], ok.shape)[ok] * SIZE + iy.repeat(_WIN, 2)[ok]) * SIZE + ix.repeat(_WIN, 1)[ok]
    np.maximum.at(canvas.reshape(-1), flat, val[ok])


def _random_nuclei(rng, patch_ids, counts, r_lo, r_hi, aspect_hi):
    """Positions and shapes for ``counts[k]`` nuclei uniformly placed in patch ``patch_ids[k]``."""
    patch = np.repeat(patch_ids, counts)
    n = len(patch)
    r = rng.uniform(r_lo, r_hi, n).astype(np.float32)
    asp = rng.uniform(1.0, aspect_hi, n).astype(np.float32)
    return (patch, rng.uniform(0, SIZE, n).astype(np.float32), rng.uniform(0, SIZE, n).astype(np.float32),
            r * np.sqrt(asp), r / np.sqrt(asp), rng.uniform(0, np.pi, n).astype(np.float32))


def _outside_centre(cy, cx, reach):
    """True where a nucleus reaching ``reach`` px from (cy, cx) cannot touch the centre 32x32."""
    ny = np.clip(cy, 32, 63.999)
    nx = np.clip(cx, 32, 63.999)
    # nearest point of the centre square, treating pixel k as the cell [k, k+1)
    gap = np.sqrt((cy - ny) ** 2 + (cx - nx) ** 2)
    return gap > reach + 0.75


def _tumour_nuclei(rng, n_patches, kind):
    """Tumour-cell nuclei for each patch; ``kind`` 0 none, 1 ring only (negative), 2 cluster over the centre,
    3 a few cells straddling the centre border (subtle positive)."""
    out = []
    for k in (1, 2, 3):
        ids = np.flatnonzero(kind == k)
        if len(ids) == 0:
            continue
        if k == 2:
            counts = rng.integers(4, 16, len(ids))
            # cluster centre anywhere near the centre square; the cells spread around it
            ccy = rng.uniform(26, 70, len(ids))
            ccx = rng.uniform(26, 70, len(ids))
            spread = rng.uniform(5, 16, len(ids))
        else:
            counts = rng.integers(1, 4, len(ids)) if k == 3 else rng.integers(1, 10, len(ids))
            ccy = ccx = spread = None
        patch = np.repeat(ids, counts)
        m = len(patch)
        r = rng.uniform(3.2, 5.8, m).astype(np.float32)
        asp = rng.uniform(1.0, 1.7, m).astype(np.float32)
        a, b = r * np.sqrt(asp), r / np.sqrt(asp)
        theta = rng.uniform(0, np.pi, m).astype(np.float32)
        if k == 2:
            rep = np.repeat(np.arange(len(ids)), counts)
            cy = ccy[rep] + rng.normal(0, 1, m) * spread[rep]
            cx = ccx[rep] + rng.normal(0, 1, m) * spread[rep]
        elif k == 3:
            # centre within +-a of a border of the centre square, so only a sliver may be inside
            side = rng.integers(0, 4, m)
            along = rng.uniform(30, 66, m)
            across = np.where(side % 2 == 0, 32.0, 64.0) + rng.uniform(-1.0, 1.0, m) * a * 0.9
            cy = np.where(side < 2, across, along)
            cx = np.where(side < 2, along, across)
        else:
            # rejection-sample positions in the outer ring; many land a few px from the centre square
            cy = np.empty(m, np.float32)
            cx = np.empty(m, np.float32)
            todo = np.arange(m)
            while len(todo):
                near = rng.random(len(todo)) < 0.5
                ty = np.where(near, rng.uniform(20, 76, len(todo)), rng.uniform(0, SIZE, len(todo)))
                tx = np.where(near, rng.uniform(20, 76, len(todo)), rng.uniform(0, SIZE, len(todo)))
                good = _outside_centre(ty, tx, a[todo])
                cy[todo[good]], cx[todo[good]] = ty[good], tx[good]
                todo = todo[~good]
        cy = np.clip(cy, 0, SIZE - 1).astype(np.float32)
        cx = np.clip(cx, 0, SIZE - 1).astype(np.float32)
        out.append((patch, cy, cx, a, b, theta))
    if not out:
        return tuple(np.zeros(0, np.float32) if i else np.zeros(0, np.int64) for i in range(6))
    return tuple(np.concatenate(parts) for parts in zip(*out))


def _render(rng, slides, kind, slide_stain):
    """Render a batch; returns (uint8 images, tumour mask)."""
    b = len(kind)
    # --- eosin: stroma/cytoplasm, low-frequency density plus fibre-like mid-frequency texture, white holes
    dens = _upsample(rng.random((b, 6, 6)))
    fibres = _upsample(rng.random((b, 24, 24)))
    eosin = 0.25 + 0.55 * dens + 0.25 * fibres
    holes = _upsample(rng.random((b, 5, 5)))
    hole_level = rng.uniform(0.65, 1.05, b)[:, None, None]  # > ~0.9: hardly any white space
    eosin = np.where(holes > hole_level, eosin * 0.12, eosin)

    hema = np.zeros((b, SIZE, SIZE), np.float32)
    # --- normal nuclei: lymphocytes (small, round, dark), density varies per patch
    n_lym = rng.poisson(rng.uniform(5, 60, b))
    _stamp(hema, *_random_nuclei(rng, np.arange(b), n_lym, 1.6, 2.8, 1.3),
           rng.uniform(0.9, 1.4, n_lym.sum()).astype(np.float32), "dense")
    # stromal fibroblasts (thin, elongated)
    n_fib = rng.poisson(rng.uniform(3, 14, b))
    _stamp(hema, *_random_nuclei(rng, np.arange(b), n_fib, 2.0, 3.0, 5.0),
           rng.uniform(0.7, 1.1, n_fib.sum()).astype(np.float32), "dense")
    # confounders: large pale nuclei (histiocytes) in a third of the patches, never in the tumour mask
    n_his = rng.poisson(np.where(rng.random(b) < 0.35, rng.uniform(1, 5, b), 0.0))
    _stamp(hema, *_random_nuclei(rng, np.arange(b), n_his, 3.0, 4.6, 1.5),
           rng.uniform(0.45, 0.75, n_his.sum()).astype(np.float32), "dense")

    # --- tumour cells: drawn on their own canvas, which *is* the tumour mask
    tum = np.zeros((b, SIZE, SIZE), np.float32)
    nuc = _tumour_nuclei(rng, b, kind)
    _stamp(tum, *nuc, rng.uniform(0.55, 1.0, len(nuc[0])).astype(np.float32), "vesicular")
    mask = tum > 0.25
    # tumour cells have more cytoplasm: a slightly denser eosin halo around the nuclei
    eosin = eosin + 0.25 * _upsample(tum[:, ::4, ::4]) * (1.0 - np.minimum(tum, 1.0))
    hema = np.maximum(hema, tum) + 0.06 * fibres

    # --- Beer-Lambert mix with per-slide stain vectors, then scanner noise
    h_od, e_od, scale = slide_stain
    od = (hema[..., None] * h_od[slides][:, None, None, :] + eosin[..., None] * e_od[slides][:, None, None, :])
    od = od * scale[slides][:, None, None, None]
    rgb = 255.0 * np.exp(-od) * rng.uniform(0.9, 1.0, (b, 1, 1, 1))
    rgb += rng.normal(0, 1, (b, 1, 1, 1)) * 4 + rng.normal(0, rng.uniform(2, 9, (b, 1, 1, 1)), rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8), mask


def _slide_stains(rng, n_slides):
    """Per-slide stain vectors: each lab/scanner/day tints hematoxylin and eosin differently."""
    h = _H_OD[None] * rng.uniform(0.75, 1.3, (n_slides, 3)) * rng.uniform(0.8, 1.25, (n_slides, 1))
    e = _E_OD[None] * rng.uniform(0.7, 1.4, (n_slides, 3)) + rng.uniform(0, 0.1, (n_slides, 3))
    scale = rng.uniform(0.7, 1.35, n_slides)
    return h.astype(np.float32), e.astype(np.float32), scale.astype(np.float32)


def generate(n: int = 2000, seed: int = 0, positive_fraction: float = 0.4, n_slides: int | None = None,
             batch: int = 250) -> SyntheticPatches:
    """Generate ``n`` patches deterministically for ``seed``; labels follow PCam's centre-32x32 rule."""
    if n < 1:
        raise UserError(f"--n must be a positive number of patches, got {n}")
    rng = np.random.default_rng(seed)
    n_slides = n_slides or max(4, n // 50)
    slides = rng.integers(0, n_slides, n)
    stains = _slide_stains(rng, n_slides)
    # patch kinds: positives are mostly clusters over the centre, some only a few border-straddling cells;
    # half of the negatives carry tumour cells in the outer ring only
    u = rng.random(n)
    pos = u < positive_fraction
    kind = np.where(pos, np.where(rng.random(n) < 0.7, 2, 3), np.where(rng.random(n) < 0.5, 1, 0))
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    masks = np.empty((n, SIZE, SIZE), bool)
    for start in range(0, n, batch):
        sl = slice(start, min(n, start + batch))
        # one child generator per batch keeps a patch's pixels independent of the batch size used
        sub = np.random.default_rng([seed, start])
        images[sl], masks[sl] = _render(sub, slides[sl], kind[sl], stains)
    labels = masks[:, CENTRE, CENTRE].any(axis=(1, 2)).astype(np.int8)
    return SyntheticPatches(images, labels, masks, slides)


def patch_ids(n: int, seed: int) -> list[str]:
    """Kaggle-like 40-hex ids, stable for (seed, index)."""
    return [hashlib.sha1(f"pcam-tune-synthetic-{seed}-{i}".encode()).hexdigest() for i in range(n)]


def write_kaggle_layout(out: str | os.PathLike, n: int = 2000, seed: int = 0, test_fraction: float = 0.2,
                        n_slides: int | None = None) -> dict:
    """Write the Kaggle layout (train/, test/, train_labels.csv, sample_submission.csv, test_labels.csv,
    slide_map.csv) into ``out``. Test patches come from their own slides, as in PCam. Returns a summary."""
    from PIL import Image

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; pass an empty or new --out folder")
    t0 = time.perf_counter()
    data = generate(n, seed, n_slides=n_slides)
    ids = patch_ids(n, seed)
    n_slides = int(data.slides.max()) + 1
    test_slides = np.random.default_rng([seed, 1]).permutation(n_slides)[: max(1, round(n_slides * test_fraction))]
    is_test = np.isin(data.slides, test_slides) if n > 1 else np.zeros(n, bool)
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "test").mkdir(exist_ok=True)
    for i, pid in enumerate(ids):
        Image.fromarray(data.images[i]).save(out / ("test" if is_test[i] else "train") / f"{pid}.tif")
    rows = lambda sel, lab: "".join(f"{ids[i]},{lab(i)}\n" for i in np.flatnonzero(sel))  # noqa: E731
    (out / "train_labels.csv").write_text("id,label\n" + rows(~is_test, lambda i: data.labels[i]))
    (out / "sample_submission.csv").write_text("id,label\n" + rows(is_test, lambda i: 0))
    (out / "test_labels.csv").write_text("id,label\n" + rows(is_test, lambda i: data.labels[i]))
    (out / "slide_map.csv").write_text("id,slide\n" + "".join(f"{ids[i]},slide_{data.slides[i]:03d}\n" for i in range(n)))
    return {"out": str(out), "n": n, "seed": seed, "train": int((~is_test).sum()), "test": int(is_test.sum()),
            "positives": float(data.labels.mean()), "slides": n_slides, "seconds": time.perf_counter() - t0}


def ensure_synthetic(root: str | os.PathLike, n: int = 2000, seed: int = 0) -> Path:
    """The synthetic Kaggle folder for (n, seed) under ``root``, generated once (atomically: a temp folder
    renamed into place, so an interrupted generation is never mistaken for a complete one)."""
    final = Path(root) / f"n{n}-seed{seed}-v{GENERATOR_VERSION}"
    if (final / "train_labels.csv").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(final.parent, final.name)  # a killed generation's
    tmp = temp_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    write_kaggle_layout(tmp, n, seed)
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@run_cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m datasets.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder to write (new or empty)")
    p.add_argument("--n", type=int, default=2000, help="number of patches, train + test (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of pseudo-slides held out as test/")
    a = p.parse_args(argv)
    s = write_kaggle_layout(a.out, a.n, a.seed, a.test_fraction)
    print(f"wrote {s['train']} train + {s['test']} test patches from {s['slides']} pseudo-slides "
          f"({s['positives']:.1%} positive) to {s['out']} in {s['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
