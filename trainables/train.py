"""The training layer's entry point: ``python -m trainables.train`` (one model, per-epoch validation metrics) and
the public API the search and refit use, gathered from the modules that hold each phase:

    trainables.config       DEFAULTS, resolve_config, pick_device, fast_path
    trainables.engine       batches, loss, optimiser, train_one_epoch, predict_views, evaluate
    trainables.loop         fit (the epoch loop), best_of (the search's objective)
    trainables.trainable    train_pcam (the Ray Tune function trainable), checkpoints, trial_cpus
    trainables.model_files  save_model, load_model, model_from_state, model_from_checkpoint_state,
                            load_checkpoint_model, predict_proba

    python -m trainables.train --backbone baseline_bn --epochs 2 [--data-dir DIR] [--lr 1e-3] ...
"""
from __future__ import annotations

import argparse
import sys

from datasets.errors import UserError, run_cli
from trainables.config import DEFAULTS, fast_path, pick_device, resolve_config  # noqa: F401 (public API)
from trainables.engine import (Diverged, SmoothedBCE, batches_per_epoch, evaluate, get_batch,  # noqa: F401
                               make_optimizer, model_step, predict_views, to_input, train_one_epoch)
from trainables.device import DEVICE_HELP, check_device
from trainables.fastpath import PRECISIONS
from trainables.loop import best_of, fit  # noqa: F401
from trainables.model_files import (load_checkpoint_model, load_model, model_from_checkpoint_state,  # noqa: F401
                                    model_from_state, predict_proba, save_model)
from trainables.trainable import (CHECKPOINT_FILE, PREDICTIONS_FILE, in_tune_session, load_checkpoint,  # noqa: F401
                                  save_checkpoint, train_pcam, trial_cpus)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainables.train",
                                description="Train one PCam classifier and print per-epoch validation metrics.")
    p.add_argument("--backbone", default=DEFAULTS["backbone"])
    p.add_argument("--data-dir", default=None, help="Kaggle folder or PCam HDF5 folder (default: embedded synthetic data)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--dropout", type=float, default=DEFAULTS["dropout"])
    p.add_argument("--aug-strength", type=float, default=DEFAULTS["aug_strength"])
    p.add_argument("--unfreeze-depth", type=int, default=None)
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false")
    p.add_argument("--input-size", type=int, default=DEFAULTS["input_size"])
    p.add_argument("--label-smoothing", type=float, default=DEFAULTS["label_smoothing"])
    p.add_argument("--pos-weight", default=None, help="a number or 'auto'")
    p.add_argument("--warmup-epochs", type=float, default=DEFAULTS["warmup_epochs"])
    p.add_argument("--val-fraction", type=float, default=DEFAULTS["val_fraction"])
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--precision", choices=PRECISIONS, default=DEFAULTS["precision"],
                   help="auto (default): bf16 + channels_last where this CPU or GPU has native bf16 (and the model "
                        "gains from it), fp16 + a gradient scaler on older GPUs, else fp32 channels_last; fp32 = the "
                        "reference path (fp32 NCHW, PyTorch's defaults); bf16, fp16 force them (see docs/training.md)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--out", default=None, help="save the trained model here (load with trainables.train.load_model)")
    return p


@run_cli
def main(argv=None) -> None:
    args = vars(get_args_parser().parse_args(argv))
    out, device = args.pop("out"), check_device(args.pop("device"))
    if args["pos_weight"] not in (None, "auto"):
        args["pos_weight"] = float(args["pos_weight"])
    model, history = train_pcam(args, device=device)
    if out:
        print(f"saved {save_model(out, model, args)}")
    if history and history[-1]["trial_status"] == "diverged":
        raise UserError(f"training diverged at epoch {history[-1]['epoch']} (non-finite loss); lower --lr")


if __name__ == "__main__":
    sys.exit(main())
