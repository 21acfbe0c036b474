"""Refit the best config of a search on all labelled data and write the Kaggle submission.

    python -m search.refit_best [--name NAME] [--folds K | --top-k K] [--epochs N] [--no-tta] [--test-labels CSV]

1. the best trial of search NAME (default: the newest) from <results>/<NAME>/best_config.json;
2. retrain its config on train + validation rows along the trial's own schedule, stopped at its best
   epoch; or, as an ensemble (search.refit.ensemble), K folds of it (with an out-of-fold AUC) or the K best configs;
3. predict the test split with 8-view TTA (averaged over the members) -> submission.csv;
4. save model.pt and submission.csv in one version folder published atomically (search.refit.outputs)
   and log an MLflow run under the search's experiment, with the model registered as ``pcam-<NAME>``
   (search.refit.registry: a pyfunc that averages the members, no pickle);
5. with test labels (PCam HDF5 test split, --test-labels, or test_labels.csv beside
   sample_submission.csv) report the test AUC and log a ROC curve.

Being killed at any point leaves the previous model.pt/submission.csv pair (or none) published; running
the command again redoes the refit and cleans up what the killed run left.

One module a step: search.refit.find (1), search.refit.data (the data again), search.refit.train (2, 3),
search.refit.outputs (4: the files), search.refit.tracking (4: MLflow, the registered model); this one is the
command line and the order.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from datasets.defaults import results_root
from datasets.errors import UserError, check_writable, run_cli
from datasets.test_labels import find_test_labels
from search.refit import outputs as refit_outputs
from search.refit.data import expected_test_ids, labelled_rows, open_search_data
from search.refit.find import find_best
from search.refit.outputs import clean_killed_outputs, report_test_auc, write_outputs
from search.refit.tracking import log_outputs, mlflow_uri, refit_mode, tracking_run
from search.refit.train import checkpoint_model, plan_members, train_members
from search.report import write_json


def refit(args) -> dict:
    results = results_root(args.results_dir)
    best = find_best(results, args.name)
    out_dir = check_writable(results / best["name"], "--results-dir", directory=True)  # before any training
    clean_killed_outputs(out_dir)

    cache = open_search_data(best, args.cache_dir)
    test_idx = cache.indices("test")
    ids = expected_test_ids(cache, test_idx) if len(test_idx) else None
    test_rows = test_idx if ids is not None else None
    test_labels, labels_from = (None, None) if ids is None else find_test_labels(cache, test_idx, ids, args.test_labels)
    members = [] if args.from_checkpoint else plan_members(best, cache, labelled_rows(cache), args)
    n_train = len(np.unique(np.concatenate([m.train_rows for m in members]))) if members else 0
    n_train = min(n_train, args.max_train_samples or n_train)

    version = refit_outputs.new_version(out_dir)
    try:
        with tracking_run(best, args, members[0].config if members else best["config"], n_train, len(members)) as run:
            summary = {"name": best["name"], "trial_id": best.get("trial_id"), "mode": refit_mode(args),
                       "from_checkpoint": bool(args.from_checkpoint), "tta": not args.no_tta, "n_train": int(n_train),
                       "model": str(out_dir / "model.pt"), "submission": None, "folder": str(version),
                       "oof_auc": None, "test_auc": None, "test_labels": labels_from,
                       "mlflow_run_id": run.info.run_id if run else None,
                       "mlflow_tracking_uri": mlflow_uri() if run else None}
            fitted = (checkpoint_model(best, cache, test_rows, args) if args.from_checkpoint
                      else train_members(members, cache, test_rows, args, run, test_labels))
            summary.update(fitted.info)
            write_outputs(version, fitted, cache, ids, summary)
            if test_labels is not None:
                est = report_test_auc(test_labels, fitted.probs, labels_from, run, version,
                                      None if cache.groups is None else cache.groups[test_idx], best.get("holdout"))
                if est is not None:
                    summary.update(test_auc=est.auc, test_auc_ci=[est.lo, est.hi])
            elif best.get("holdout"):
                print(refit_outputs.holdout_line(best["holdout"]))
            summary["search_holdout"] = best.get("holdout")
            write_json(version / "refit.json", summary)
            refit_outputs.publish(out_dir, version)
            print(f"published {version.name}: {out_dir / 'model.pt'}"
                  + (f", {out_dir / 'submission.csv'}" if ids is not None else ""))
            if run is not None:
                example_rows = test_idx if len(test_idx) else labelled_rows(cache)
                log_outputs(best, cache, example_rows, out_dir, summary)
                write_json(version / "refit.json", summary)
    except BaseException:
        if refit_outputs.published(out_dir) != version.resolve():
            refit_outputs.discard(version)  # never published: the previous refit stays as it was
        raise
    return summary


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search.refit_best", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", help="search name (default: the most recent search under the results folder)")
    p.add_argument("--folds", type=int, metavar="K",
                   help="ensemble: K models of the best config on K folds of the labelled data (slide-grouped when "
                        "the slides are known), with an out-of-fold AUC; the submission averages them")
    p.add_argument("--top-k", type=int, metavar="K",
                   help="ensemble: the K best distinct configs of the search, each on all labelled data, averaged")
    p.add_argument("--epochs", type=int,
                   help="stop after this epoch of the trial's schedule (default: the epoch at which the trial peaked)")
    p.add_argument("--no-tta", action="store_true", help="predict the plain view only (default: mean of 8 dihedral views)")
    p.add_argument("--test-labels", metavar="CSV", help="id,label file of the test patches: report test AUC and a ROC curve")
    p.add_argument("--results-dir", help="results root (default $PCAM_TUNE_RESULTS or ./results)")
    p.add_argument("--cache-dir", help="cache root when the search's cache must be rebuilt (default $PCAM_TUNE_CACHE or ~/.cache/pcam-tune)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the search's)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log or register anything in MLflow")
    p.add_argument("--seed", type=int, help="training seed (default: the trial's)")
    p.add_argument("--max-train-samples", type=int, metavar="N",
                   help="refit on a seeded random N of the labelled rows (default: all of them)")
    p.add_argument("--from-checkpoint", action="store_true",
                   help="no refit: predict with the best trial's checkpoint (trained on the train split only)")
    p.add_argument("--batch-size", type=int, help="images per prediction forward pass (default 64 on CPU, 256 on GPU)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                   help="training and prediction precision (default: the search's, in its best_config.json; "
                        "auto = bf16 where this CPU or GPU has native bf16 and the model gains from it, fp16 + a "
                        "gradient scaler on older GPUs, else fp32)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one, else the CPU), cpu, cuda or cuda:N")
    return p


def check_args(args) -> None:
    from trainables.device import pick_device

    pick_device(args.device)  # a device this machine lacks: one line now, not after the data is read
    for option in ("epochs", "max_train_samples", "batch_size"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise UserError(f"--{option.replace('_', '-')} {value}: must be at least 1")
    if args.folds is not None and args.top_k is not None:
        raise UserError("--folds and --top-k: choose one (K folds of the best config, or the K best configs)")
    if args.from_checkpoint and (args.folds is not None or args.top_k is not None):
        raise UserError("--from-checkpoint uses the one trial checkpoint: it cannot be combined with --folds or --top-k")


@run_cli
def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from search.tracking import quiet_artifact_bars

    quiet_artifact_bars()
    args = get_args_parser().parse_args(argv)
    check_args(args)
    t0 = time.perf_counter()
    summary = refit(args)
    print(f"refit done in {time.perf_counter() - t0:.0f}s")
    if summary.get("mlflow_run_id"):
        from search.tracking import ui_command

        print(f"registered model pcam-{summary['name']} version {summary.get('registered_version')}; "
              f"MLflow UI: {ui_command(summary['mlflow_tracking_uri'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
