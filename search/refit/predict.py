"""Score a folder of PCam .tif patches with a saved model.

    python -m search.predict --model results/NAME/model.pt --images DIR --out scores.csv

Writes ``id,label`` (id = file name without .tif, label = tumour probability), sorted by id, with
the mean of the 8 dihedral views by default (--no-tta for the plain view); an ensemble's model file
(refit_best --folds/--top-k) gives the mean of its members, as in its submission. Images are read and
checked by the datasets layer (96x96 RGB uint8), so a bad file stops with its name. The folder is read and
scored ``CHUNK`` patches at a time, so memory stays bounded whatever its size (the Kaggle test set is 57,458
patches; decoding it whole took 1.6 GB). Inference runs on a GPU when there is one (--device), in each
network's precision setting (saved with it; --precision overrides it, trainables.fastpath has the rule), with as
many threads as the CPUs this process may use. An --out that cannot be written stops before anything is scored.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from datasets.errors import DataError, UserError, check_writable, run_cli
from datasets.files import clean_stale_temps
from search.refit import submission as sub
from trainables.device import DEVICE_HELP, check_device
from trainables.fastpath import PRECISIONS

CHUNK = 4096  # patches decoded and scored at a time: 113 MB of uint8 images (refit reads its cache alike)


def tif_ids(images_dir: Path) -> list[str]:
    """Ids (file names without .tif, sorted) of the patches in ``images_dir``; other files are reported."""
    if not images_dir.is_dir():
        raise UserError(f"--images {images_dir}: not a folder")
    files = [p for p in images_dir.iterdir() if p.is_file() and not p.name.startswith(".")]
    ids = sorted(p.stem for p in files if p.suffix == ".tif")
    if not ids:
        raise DataError(f"--images {images_dir}: no .tif patches in it (Kaggle PCam patches are <id>.tif)")
    if len(ids) < len(files):
        print(f"note: scoring the {len(ids):,} .tif files of {images_dir}; ignoring {len(files) - len(ids)} other file(s)")
    return ids


def score_folder(model_path: Path, images_dir: Path, tta: bool = True, batch_size: int | None = None,
                 precision: str | None = None, device: str = "auto") -> tuple[list[str], np.ndarray]:
    """Ids and probabilities of a folder's patches; an ensemble model file averages its members."""
    import torch
    from tqdm.auto import tqdm

    from datasets.images import read_patches
    from search.refit.ensemble import load_ensemble
    from trainables.train import fast_path, pick_device, trial_cpus

    if not Path(model_path).is_file():
        raise UserError(f"--model {model_path}: not found (train one with `python -m search.refit_best`)")
    torch.set_num_threads(trial_cpus())
    model = load_ensemble(model_path, pick_device(device))
    for net, config in model.members:
        if precision:
            config["precision"] = precision
        dev = next(net.parameters()).device
        path = fast_path(config, dev, training=False)
        print(f"scoring with {config['backbone']}: {path.name} on {dev} ({path.reason}), batch "
              f"{batch_size or path.inference_batch()}, {torch.get_num_threads()} thread(s), "
              f"TTA {'8 views' if tta else 'off'}", flush=True)
    ids = tif_ids(images_dir)
    probs = np.empty(len(ids), dtype=np.float32)
    with tqdm(total=len(ids), desc="score", unit="img", leave=False) as bar:
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start:start + CHUNK]
            images = read_patches(images_dir, chunk, progress=False)
            probs[start:start + len(chunk)] = model.predict_proba(images, tta=tta, batch_size=batch_size)
            bar.update(len(chunk))
    return ids, probs


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a model.pt written by search.refit_best (one model or an ensemble) or trainables' save_model")
    p.add_argument("--images", required=True, help="folder of 96x96 RGB .tif patches")
    p.add_argument("--out", required=True, help="CSV to write (id,label)")
    p.add_argument("--no-tta", action="store_true", help="plain view only (default: mean of 8 dihedral views)")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default 64 on CPU, 256 on GPU)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="auto | fp32 | bf16 | fp16 (default: the model's setting, saved with it; auto = bf16 where "
                        "this CPU or GPU has native bf16, fp16 on older GPUs, else fp32)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    return p


@run_cli
def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    out = check_writable(args.out, "--out")  # before minutes of scoring, not after
    ids, probs = score_folder(Path(args.model), Path(args.images), tta=not args.no_tta, batch_size=args.batch_size,
                              precision=args.precision, device=check_device(args.device))
    clean_stale_temps(out.parent, out.name)  # a killed earlier run's temporary
    sub.write_submission(out, np.asarray(ids), probs)
    print(f"wrote {out} ({len(ids):,} patches, TTA {'off' if args.no_tta else 'on'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
