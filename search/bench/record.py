"""`python -m search.bench record`: a tabular learning-curve benchmark of real PCam patches (LCBench-style).

Every configuration of a discretised ``backbones`` space (baseline_bn from scratch, mobilenet_v2 from ImageNet
weights) is trained with the product's own training loop (trainables.train.fit) to max epochs, with no early
stopping, and every epoch is recorded: val AUC on the validation split a search would use (and under the stain
shift below), held-out AUC on patches no trial ever trains or validates on (the sample's labelled test patches), the same held-out AUC under a fixed
strong stain/colour shift of those patches (a stand-in for another hospital's scanner), losses and seconds.
`search.bench.replay` then replays searches against the table in minutes.

The recording is resumable and appends: the file is rewritten (atomically) after every configuration, and a
rerun skips what is recorded. Several recorders may share one file (``--shard K/N``, e.g. one per core): each
rewrites it under a lock after re-reading it, so none drops another's records. The grid is walked in a shuffled order (fixed seed) so that a partial table is a
balanced sample of the grid; every 8th configuration is followed by its second-seed twin (seed noise).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

FORMAT = "pcam-tune-lcbench/1"
DEFAULT_OUT = "bench/recorded/pcam_lcbench.json"
REAL_SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "pcam_sample"
LRS = [1e-4, 5.6e-4, 3.2e-3, 1.8e-2, 1e-1]  # geomspace(1e-4, 1e-1, 5): too slow .. diverging
GRID = {
    "baseline_bn": {"lr": LRS, "weight_decay": [1e-5, 1e-2], "aug_strength": [0.0, 0.5, 1.0],
                    "batch_size": [32, 128], "unfreeze_depth": [None]},
    "mobilenet_v2": {"lr": LRS, "weight_decay": [1e-5, 1e-2], "aug_strength": [0.0, 0.5, 1.0],
                     "batch_size": [32, 128], "unfreeze_depth": [0, 3, 6]},  # head only, half, all 6 stages
}
KEYS = ("backbone", "lr", "weight_decay", "aug_strength", "batch_size", "unfreeze_depth", "seed")
# A fixed strong stain shift in HED space (Ruifrok & Johnston's stain vectors, as scikit-image's rgb2hed):
# more haematoxylin, less eosin, a little DAB, as a scanner/staining protocol of another hospital might give.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
SHIFT_SCALE, SHIFT_BIAS = np.array([1.35, 0.65, 1.0]), np.array([0.0, 0.0, 0.03])


def stain_shift(images_u8: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> the same patches with the fixed stain shift (optical density in HED space)."""
    m = RGB_FROM_HED
    od = -np.log(np.maximum(images_u8.astype(np.float64), 1.0) / 255.0)
    hed = od @ np.linalg.inv(m)
    rgb = 255.0 * np.exp(-((hed * SHIFT_SCALE + SHIFT_BIAS) @ m))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def grid_configs(grid: dict = GRID, order_seed: int = 0, second_seed_every: int = 8, n_second: int = 30) -> list[dict]:
    """Every grid point (seed 0) in a shuffled order; every ``second_seed_every``-th is followed by its seed-1 twin."""
    points = []
    for backbone, axes in grid.items():
        for values in itertools.product(*(axes[k] for k in KEYS[1:-1])):
            points.append({"backbone": backbone, **dict(zip(KEYS[1:-1], values)), "seed": 0})
    order = np.random.default_rng(order_seed).permutation(len(points))
    out = []
    for i, j in enumerate(order):
        out.append(points[j])
        if i % second_seed_every == 0 and i // second_seed_every < n_second:
            out.append({**points[j], "seed": 1})
    return out


def config_key(c: dict) -> str:
    return "|".join(f"{k}={c[k]}" for k in KEYS)


def pool_rows(cache, n_train: int, n_val: int, seed: int = 18):
    """(train rows, val rows, held-out rows): a stratified sample of the labelled train split, and the test split
    (labelled by test_labels.csv), which no trial trains or validates on."""
    from datasets.test_labels import find_test_labels
    from datasets.errors import UserError

    rows = cache.indices("train")
    rng = np.random.default_rng(seed)
    labels = cache.labels[rows]
    pick = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[: (n_train + n_val) // 2]
                                   for c in (0, 1)]))
    tr, va = _fixed_val_positions(labels[pick], n_val / (n_train + n_val), seed)
    test = cache.indices("test")
    held_labels, where = find_test_labels(cache, test, cache.ids[test], None)
    if held_labels is None:
        raise UserError(f"record: the data at {cache.source.get('data_dir')} has no test labels (test_labels.csv): "
                        "the held-out patches need them")
    return rows[pick][tr], rows[pick][va], test, held_labels.astype(np.int8)


def _fixed_val_positions(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) positions of the recorded table's pool, drawn as when recording began (a seeded permutation per
    class): the table's setup holds their hash (rows_sha256), so these rows must not move with datasets.splits'
    policy (scikit-learn's stratified folds), or the recording could not resume."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        pos = rng.permutation(np.flatnonzero(labels == c))
        val.append(pos[: max(1, int(round(len(pos) * val_fraction)))])
    val = np.sort(np.concatenate(val))
    return np.setdiff1d(np.arange(len(labels)), val), val


def provenance(args, argv, cache) -> dict:
    import optuna
    import ray
    import torch

    from trainables.fastpath import cpu_summary

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"command": "python -m search.bench record " + shlex.join(argv), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
            time.gmtime()), "host": platform.node(), "cpu": cpu_summary(), "gpu": gpu, "torch_threads": args.threads,
            "python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
            "optuna": optuna.__version__, "ray": ray.__version__, "data_dir": str(args.data_dir),
            "data_fingerprint": cache.fingerprint}


def auc(labels, probs) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, probs))


def record_one(c: dict, cache, rows, held, args) -> dict:
    """Train one config to max epochs with trainables.train.fit; one entry per epoch."""
    from trainables.train import fit, model_from_checkpoint_state, predict_views

    train_idx, val_idx = rows
    held_x, held_shift, held_y, val_shift = held
    cfg = {k: c[k] for k in KEYS} | {"pretrained": True, "epochs": args.max_epochs, "precision": args.precision}
    epochs = []

    def on_epoch(m, state, preds):
        e = {"epoch": m["epoch"], "status": m["trial_status"], "seconds": round(m["epoch_seconds"], 3),
             "train_loss": _r(m["train_loss"]), "val_loss": _r(m["val_loss"]), "val_auc": _r(m["val_auc"])}
        if state is not None:
            model = model_from_checkpoint_state(state)  # a depth-0 config's is its head on the frozen backbone
            n, probs = len(held_y), predict_views(model, np.concatenate([held_x, held_shift, val_shift]), state["config"])
            e["heldout_auc"], e["shifted_auc"] = _r(auc(held_y, probs[:n])), _r(auc(held_y, probs[n:2 * n]))
            e["val_shifted_auc"] = _r(auc(cache.labels[val_idx], probs[2 * n:]))  # validating under the shift
        epochs.append(e)

    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    fit(cfg, cache, train_idx, val_idx, on_epoch=on_epoch)
    # The machine's load around it: seconds recorded on a busy shared machine are slower than on an idle one.
    return {"key": config_key(c), "config": c, "epochs": epochs, "wall_seconds": round(time.perf_counter() - t0, 1),
            "loadavg": [round(load0, 2), round(os.getloadavg()[0], 2)]}


def _r(x) -> float | None:
    return None if x is None or x != x else round(float(x), 6)


def setup_of(args, rows, held_rows) -> dict:
    ids = hashlib.sha256()
    for r in (*rows, held_rows):
        ids.update(np.asarray(r, dtype=np.int64).tobytes())
    return {"space": "backbones (discretised)", "grid": GRID, "max_epochs": args.max_epochs, "precision": args.precision,
            "n_train": len(rows[0]), "n_val": len(rows[1]), "n_heldout": len(held_rows),
            "rows_sha256": ids.hexdigest()[:16], "val": "stratified by patch, fixed (the sample has no slide map)",
            "heldout": "the sample's test split, labels from test_labels.csv",
            "val_shifted": "val_shifted_auc: the val split under the same shift (validating under shift)",
            "shift": {"space": "HED optical density", "scale": SHIFT_SCALE.tolist(), "bias": SHIFT_BIAS.tolist()},
            "order_seed": 0, "second_seed_every": 8, "n_second_seed": 30,
            # What the product trains, so a table is never a mix of two versions of it: the augmentation's bounds
            # (issue 19 narrowed shift and zoom) and how an unfreeze_depth 0 trial trains (issue 21: a head on the
            # embedding cache, the 8 dihedral views as its augmentation).
            "augmentation": _augmentation(), "frozen_backbone": "head on cached features (trainables.probe)"}


def _augmentation() -> dict:
    from trainables import augment as a
    return {k: getattr(a, k) for k in ("MAX_SHIFT", "MAX_ZOOM", "MAX_BRIGHTNESS", "MAX_CONTRAST", "MAX_SATURATION",
                                        "MAX_HUE")}


def load_table(path: Path) -> dict:
    from datasets.errors import UserError

    try:
        table = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"--recorded {path}: cannot read the recorded benchmark ({exc})") from None
    if table.get("format") != FORMAT:
        raise UserError(f"--recorded {path}: not a {FORMAT} file (format {table.get('format')!r})")
    return table


def write_table(path: Path, table: dict) -> None:
    """Atomically (datasets.files): the header indented, one line per record (small, diffable)."""
    from datasets.files import write_atomically

    head = {k: v for k, v in table.items() if k != "records"}
    text = json.dumps(head, indent=1)[:-2] + ',\n "records": [\n' + ",\n".join(
        json.dumps(r, separators=(",", ":")) for r in table["records"]) + "\n ]\n}\n"
    write_atomically(path, text)


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock beside ``path`` (``<path>.lock``, git-ignored), held while a recorder re-reads and rewrites."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def append_to_table(path: Path, setup: dict, run: dict | None = None, record: dict | None = None) -> dict:
    """Under the lock: re-read the file (another shard may have written), check its setup, append a run's provenance
    or a record (its ``run`` index is set here), rewrite it atomically; returns the table as written."""
    from datasets.errors import UserError

    with locked(path):
        table = load_table(path) if path.is_file() else {"format": FORMAT, "setup": setup, "runs": [], "records": []}
        if json.loads(json.dumps(setup)) != table["setup"]:
            raise UserError(f"record: {path} was recorded with another setup (grid, pool, epochs or precision); "
                            "pass another --out or the same options")
        if run is not None:
            table["runs"].append(run)
        if record is not None and record["key"] not in {r["key"] for r in table["records"]}:
            table["records"].append(record)
        write_table(path, table)
    return table


def shard_of(text: str) -> tuple[int, int]:
    """``K/N`` (1 <= K <= N) -> (K-1, N); one line naming the option otherwise."""
    from datasets.errors import UserError

    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        k = n = 0
    if not 1 <= k <= n:
        raise UserError(f"--shard {text!r}: expected K/N with 1 <= K <= N, e.g. --shard 1/2 and --shard 2/2 "
                        "for two recorders sharing the file")
    return k - 1, n


def get_args_parser():
    p = argparse.ArgumentParser(prog="python -m search.bench record", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=DEFAULT_OUT, help=f"the table, appended to (default {DEFAULT_OUT})")
    p.add_argument("--data-dir", default=None, help="the real sample (default ../shared/pcam_sample beside the repo)")
    p.add_argument("--cache-dir")
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--n-val", type=int, default=256)
    p.add_argument("--max-epochs", type=int, default=6)
    p.add_argument("--precision", default="fp32", help="fp32 (default: the same numbers on every machine)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--limit", type=int, help="record at most this many new configurations, then stop")
    p.add_argument("--shard", default="1/1", help="K/N: record every N-th configuration of the grid's order, "
                   "starting at the K-th, so N recorders (one per core) share --out (default 1/1: all)")
    return p


def main(argv: list[str]) -> int:
    import torch

    from datasets.cache import prepare_dataset
    from datasets.errors import UserError

    args = get_args_parser().parse_args(argv)
    shard, n_shards = shard_of(args.shard)
    args.data_dir = args.data_dir or str(REAL_SAMPLE)
    torch.set_num_threads(args.threads)
    cache = prepare_dataset(args.data_dir, args.cache_dir, progress=False)
    tr, va, held_rows, held_y = pool_rows(cache, args.n_train, args.n_val)
    setup = setup_of(args, (tr, va), held_rows)
    out = Path(args.out)
    table = append_to_table(out, setup, run=provenance(args, argv, cache))
    run = len(table["runs"]) - 1
    held_x = np.ascontiguousarray(cache.images[held_rows])
    held = (held_x, stain_shift(held_x), held_y, stain_shift(np.ascontiguousarray(cache.images[va])))
    grid = grid_configs()
    done = {r["key"] for r in table["records"]}
    mine = [c for i, c in enumerate(grid) if i % n_shards == shard and config_key(c) not in done]
    print(f"recording {out}: {len(done)}/{len(grid)} done, {len(mine)} to go in shard {shard + 1}/{n_shards}; "
          f"{len(tr)} train, {len(va)} val, {len(held_rows)} held-out patches, {args.max_epochs} epochs, "
          f"{args.threads} thread(s)", flush=True)
    for c in mine[:args.limit]:
        rec = record_one(c, cache, (tr, va), held, args) | {"run": run}
        table = append_to_table(out, setup, record=rec)
        last = rec["epochs"][-1]
        print(f"[{len(table['records'])}/{len(grid)}] {rec['key']}: val {last['val_auc']} held-out "
              f"{last.get('heldout_auc')} shifted {last.get('shifted_auc')} ({last['status']}, "
              f"{rec['wall_seconds']:.0f} s)", flush=True)
    return 0
