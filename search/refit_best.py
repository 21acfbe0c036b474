"""Refit the best config of a search on all labelled data and write the Kaggle submission.

    python -m search.refit_best [--name NAME] [--folds K | --top-k K] [--epochs N] [--no-tta] [--test-labels CSV]

1. the best trial of search NAME (default: the newest) from <results>/<NAME>/best_config.json;
2. retrain its config on train + validation rows along the trial's own schedule, stopped at its best
   epoch; or, as an ensemble (search.ensemble), K folds of it (with an out-of-fold AUC) or the K best configs;
3. predict the test split with 8-view TTA (averaged over the members) -> submission.csv;
4. save model.pt and submission.csv in one version folder published atomically (search.refit_outputs)
   and log an MLflow run under the search's experiment, with the model registered as ``pcam-<NAME>``
   (search.registry: a pyfunc that averages the members, no pickle);
5. with test labels (PCam HDF5 test split, --test-labels, or test_labels.csv beside
   sample_submission.csv) report the test AUC and log a ROC curve.

Being killed at any point leaves the previous model.pt/submission.csv pair (or none) published; running
the command again redoes the refit and cleans up what the killed run left.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasets.defaults import results_root
from datasets.errors import DataError, UserError, run_cli
from search import refit_outputs
from search import submission as sub
from search.ensemble import Ensemble, Member, average, fit_members, fold_members, member_config, out_of_fold, top_k_members
from search.refit_tracking import (epoch_reporter, log_member_metrics, log_outputs, member_run, mlflow_uri,
                                   refit_mode, tracking_run)
from search.report import write_json

PREDICT_CHUNK = 4096  # rows decoded from the memmap at a time (57k full test set would be 1.6 GB)


# ---------------------------------------------------------------- finding the search
def find_best(results: Path, name: str | None) -> dict:
    """The best_config.json of search ``name`` (default: the newest one), checked for a usable trial."""
    if name is None:
        found = sorted(results.glob("*/best_config.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise UserError(f"no search found under {results}: run `python -m search.run --space smoke --name demo` first")
        path = found[-1]
    else:
        path = results / name / "best_config.json"
        if not path.is_file():
            raise UserError(_missing_search_message(results, name))
    try:
        best = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({e}): rerun `python -m search.run --name {path.parent.name}`") from None
    missing = [k for k in ("name", "config", "best_epoch") if k not in best]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: it was not written by search.run; rerun the search")
    auc, status = best.get("best_val_auc"), str(best.get("status"))
    if auc is None or math.isnan(float(auc)) or not best.get("best_epoch") or status.startswith(("diverged", "errored")):
        raise UserError(
            f"search {best['name']!r} has no completed trial (best trial status {best.get('status')!r}): "
            f"rerun `python -m search.run --name {best['name']}` with more epochs or a lower learning rate"
        )
    best["_path"] = str(path)
    cross_check(best)
    return best


def cross_check(best: dict) -> None:
    """Warn when the Ray experiment now holds a better trial than best_config.json names.

    That happens when a search was resumed (or extended) after best_config.json was written and
    has not finished yet. Reads the experiment's files (ExperimentAnalysis); no Ray cluster starts.
    """
    exp = best.get("experiment_path")
    if not exp or ("://" not in str(exp) and not Path(exp).is_dir()):
        return
    from ray.tune import ExperimentAnalysis

    try:
        top = ExperimentAnalysis(exp).get_best_trial("val_auc", "max", scope="all")
    except Exception as e:  # a foreign/partial experiment folder must not block the refit
        print(f"note: could not read the Ray experiment {exp} to cross-check ({type(e).__name__}); using best_config.json")
        return
    if top is not None and top.trial_id != best.get("trial_id"):
        top_auc = top.metric_analysis.get("val_auc", {}).get("max", float("nan"))
        print(f"warning: the Ray experiment {exp} now ranks trial {top.trial_id} first (val_auc {top_auc:.4f}), "
              f"best_config.json names {best.get('trial_id')}: finish the search with "
              f"`python -m search.run --name {best['name']} --resume` to update it")


def _missing_search_message(results: Path, name: str) -> str:
    if (results / "ray" / name).is_dir():
        return (f"search {name!r} has no {results / name / 'best_config.json'} (it did not finish): "
                f"resume it with `python -m search.run --name {name} --resume`")
    known = sorted(p.parent.name for p in results.glob("*/best_config.json"))
    hint = f" (searches here: {', '.join(known)})" if known else ""
    return f"no search named {name!r} under {results}{hint}: run `python -m search.run --space smoke --name {name}`"


# ---------------------------------------------------------------- data
def open_search_data(best: dict, cache_dir: str | None):
    """The search's cache (reopened when still there, else rebuilt from its data_dir and slide map)."""
    from datasets.cache import open_cache, prepare_dataset

    cache_path = best.get("cache_path")
    if cache_path and Path(cache_path).is_dir() and cache_dir is None:
        try:
            cache = open_cache(cache_path)
        except DataError:
            cache = None  # a stale/partial cache: rebuild it below
        if cache is not None and cache.fingerprint == best.get("data_fingerprint", cache.fingerprint):
            return cache
    # The slide map the search used (None: the data dir's own slide_map.csv, if any): folds stay slide-grouped.
    cache = prepare_dataset(data_dir=best.get("data_dir"), cache_dir=cache_dir, progress=True,
                            slide_map=best.get("slide_map"))
    if best.get("data_fingerprint") and cache.fingerprint != best["data_fingerprint"]:
        print(f"warning: the data in {best.get('data_dir') or 'the synthetic set'} changed since the search "
              f"(fingerprint {cache.fingerprint[:12]} vs {best['data_fingerprint'][:12]}); refitting on the current data")
    return cache


def labelled_rows(cache) -> np.ndarray:
    """All rows with a label outside the test split: train + (PCam HDF5) valid."""
    rows = np.flatnonzero((cache.split != "test") & (cache.labels >= 0))
    if len(rows) == 0:
        raise DataError(f"the cache {cache.path} has no labelled train/valid rows: check the data dir {cache.source.get('data_dir')}")
    return rows


def expected_test_ids(cache, test_idx: np.ndarray) -> np.ndarray:
    """The ids the submission must carry: sample_submission.csv's, checked against the cache's test rows."""
    ids = cache.ids[test_idx].astype(str)
    data_dir = cache.source.get("data_dir")
    sample = Path(data_dir) / "sample_submission.csv" if data_dir else None
    if sample is None or not sample.is_file():
        return ids  # PCam HDF5: the test split's own order is the order
    want = sub.read_id_csv(sample, "sample submission")["id"].astype(str).to_numpy()
    if len(want) != len(ids) or (want != ids).any():
        raise DataError(
            f"the cache's {len(ids)} test ids do not match the {len(want)} ids of {sample} in order: "
            f"rebuild the cache (delete {cache.path} and rerun)"
        )
    return want


def find_test_labels(cache, test_idx: np.ndarray, ids: np.ndarray, arg: str | None) -> tuple[np.ndarray | None, str | None]:
    """Test labels and where they came from: --test-labels, the cache (PCam HDF5), or test_labels.csv beside the data."""
    if arg:
        return sub.read_test_labels(Path(arg), ids), str(arg)
    labels = cache.labels[test_idx]
    if len(labels) and (labels >= 0).all():
        return labels.astype(np.int8), "the cache's test split"
    data_dir = cache.source.get("data_dir")
    beside = Path(data_dir) / "test_labels.csv" if data_dir else None
    if beside is not None and beside.is_file():
        return sub.read_test_labels(beside, ids), str(beside)
    return None, None


# ---------------------------------------------------------------- main steps
@dataclass
class Fitted:
    """What the training phase hands the output phase."""
    ensemble: Ensemble
    probs: np.ndarray | None  # test probabilities (None: no test split)
    info: dict  # epochs, seed, members: for refit.json
    oof: dict | None = None  # search.ensemble.out_of_fold's result (--folds)


def refit(args) -> dict:
    results = results_root(args.results_dir)
    best = find_best(results, args.name)
    out_dir = results / best["name"]
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
                summary["test_auc"] = report_test_auc(test_labels, fitted.probs, labels_from, run, version)
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


def clean_killed_outputs(out_dir: Path) -> None:
    """What an interrupted refit left: its unpublished version folder, temporaries of the older flat layout."""
    if not out_dir.is_dir():
        return
    removed = refit_outputs.clean_stale(out_dir)
    for entry in refit_outputs.ENTRIES:
        removed += sub.clean_stale_tmp(out_dir / entry)
    for path in removed:
        print(f"removed {path.name}, left by an interrupted refit")


def plan_members(best: dict, cache, rows: np.ndarray, args) -> list[Member]:
    """The networks to train: the best trial, K folds of it, or the K best configs of the search."""
    def make(config, best_epoch, where):
        config, stop = member_config(config, best_epoch, args.epochs, args.seed, args.max_train_samples, where)
        if args.precision:  # --precision overrides the search's (argparse checked it)
            config["precision"] = args.precision
        return config, stop

    if args.top_k:
        return top_k_members(best, args.top_k, make, rows)
    config, stop = make(best["config"], best["best_epoch"], best["_path"])
    single = Member("refit", config, stop, rows, trial_id=best.get("trial_id"), search_val_auc=best.get("best_val_auc"))
    if not args.folds:
        return [single]
    groups = None if cache.groups is None else cache.groups[rows]
    print(f"{args.folds} folds of the {len(rows):,} labelled patches, "
          + ("slide-grouped (no slide in two folds)" if groups is not None else
             "stratified by patch (no slide map: patches of one slide may sit in two folds, so the out-of-fold "
             "AUC can be optimistic)"))
    return fold_members(single, cache.labels[rows], groups, args.folds)


def train_members(members: list[Member], cache, test_rows, args, run, test_labels) -> Fitted:
    """Train every member, predict the test rows (and each fold's held-out rows); average the members."""
    member_runs: dict[str, str] = {}

    def train_one(m: Member):
        n = min(len(m.train_rows), m.config["max_train_samples"] or len(m.train_rows))
        print(f"{'' if len(members) == 1 else f'member {members.index(m) + 1}/{len(members)}, {m.name}: '}"
              f"trial {m.trial_id} (val AUC {m.search_val_auc:.4f} at epoch {m.stop_epoch}) on {n:,} labelled patches"
              + (f", holding out {len(m.held_out_rows):,}" if len(m.held_out_rows) else "")
              + f": epochs 1-{m.stop_epoch} of its {m.config['epochs']}-epoch schedule, seed {m.config['seed']}", flush=True)
        with member_run(run, m, n, len(members)) as mrun:
            if mrun is not None:
                member_runs[m.name] = mrun.info.run_id
            return train(m, cache, run is not None)

    def predict_rows(net, m: Member, rows):
        return predict_cache_rows(net, cache, rows, m.config, not args.no_tta, args.batch_size)

    trained = fit_members(members, train_one, predict_rows, test_rows)
    oof = out_of_fold(trained, lambda rows: cache.labels[rows]) if args.folds else None
    info = {"epochs": members[0].stop_epoch, "schedule_epochs": members[0].config["epochs"],
            "seed": members[0].config["seed"], "members": member_summaries(trained, test_labels, oof, member_runs)}
    if oof is not None:
        info.update(oof_auc=oof["oof_auc"], fold_aucs=oof["fold_aucs"])
    log_member_metrics(run, info["members"])
    return Fitted(Ensemble([(t.net, t.member.config) for t in trained], [t.member.name for t in trained]),
                  None if test_rows is None else average([t.test_probs for t in trained]), info, oof)


def member_summaries(trained, test_labels, oof: dict | None, member_runs: dict) -> list[dict]:
    """One refit.json entry per member: what it trained on and how it scored on its own."""
    from sklearn.metrics import roc_auc_score

    out = []
    for i, t in enumerate(trained):
        m = t.member
        two_classes = test_labels is not None and t.test_probs is not None and len(np.unique(test_labels)) == 2
        out.append({"name": m.name, "trial_id": m.trial_id, "search_val_auc": m.search_val_auc,
                    "epochs": m.stop_epoch, "schedule_epochs": m.config["epochs"], "seed": m.config["seed"],
                    "n_train": int(min(len(m.train_rows), m.config["max_train_samples"] or len(m.train_rows))),
                    "n_held_out": int(len(m.held_out_rows)),
                    "held_out_auc": oof["fold_aucs"][i] if oof is not None else None,
                    "test_auc": float(roc_auc_score(test_labels, t.test_probs)) if two_classes else None,
                    "mlflow_run_id": member_runs.get(m.name)})
    return out


def train(m: Member, cache, log_to_mlflow: bool):
    from trainables.train import fast_path, fit, pick_device

    path = fast_path(m.config, pick_device(), training=True)
    print(f"training {m.config['backbone']} in {path.name} ({path.reason})", flush=True)
    model, history = fit(m.config, cache, m.train_rows, val_idx=None, on_epoch=epoch_reporter(m.stop_epoch, log_to_mlflow),
                         progress=True, stop_epoch=m.stop_epoch)
    if history and history[-1].get("trial_status") == "diverged":
        raise UserError(f"the refit ({m.name}) diverged at epoch {history[-1]['epoch']} (non-finite loss), nothing "
                        f"written: retry with another --seed, or rerun the search with a lower learning rate")
    return model


def checkpoint_model(best: dict, cache, test_rows, args) -> Fitted:
    """--from-checkpoint: the best trial's own weights (trained on the train split only), no refit."""
    from search.storage import local_checkpoint
    from trainables.train import CHECKPOINT_FILE, load_checkpoint_model

    folder = best.get("checkpoint_path")
    missing = UserError(f"the best trial's checkpoint {folder} is missing ({best['_path']}): "
                        f"refit without --from-checkpoint, or rerun `python -m search.run --name {best['name']}`")
    if not folder:
        raise missing
    with local_checkpoint(folder) as local:  # a folder, or a download of an object-store URI
        if not (local / CHECKPOINT_FILE).is_file():
            raise missing
        net, cfg, epoch = load_checkpoint_model(local)
    print(f"using the best trial's checkpoint {folder} (epoch {epoch}), no refit")
    probs = None if test_rows is None else predict_cache_rows(net, cache, test_rows, cfg, not args.no_tta, args.batch_size)
    return Fitted(Ensemble([(net, cfg)], ["checkpoint"]), probs, {"epochs": epoch, "seed": cfg["seed"], "members": []})


def write_outputs(version: Path, fitted: Fitted, cache, ids, summary) -> None:
    """model.pt, submission.csv (validated) and, for folds, oof.csv into the unpublished version folder."""
    fitted.ensemble.save(version / "model.pt")
    if ids is not None:
        sub.write_submission(version / "submission.csv", ids, fitted.probs)
        summary["submission"] = str(version.parent / "submission.csv")
    else:
        print("no test split in this data (no test/ + sample_submission.csv): wrote the model only")
    if fitted.oof is not None:
        write_oof(version / "oof.csv", fitted.oof, cache)
        summary["oof"] = str(version.parent / "oof.csv")


def write_oof(path: Path, oof: dict, cache) -> None:
    """id,label,fold[,slide],prob of every labelled patch, each scored by the fold model that never trained on it."""
    import pandas as pd

    table = {"id": cache.ids[oof["rows"]], "label": oof["labels"], "fold": oof["fold"]}
    if cache.groups is not None:
        table["slide"] = cache.groups[oof["rows"]]
    pd.DataFrame({**table, "prob": sub.exact_floats(oof["probs"])}).to_csv(path, index=False)
    folds = ", ".join("n/a" if a is None else f"{a:.4f}" for a in oof["fold_aucs"])
    print(f"out-of-fold AUC {oof['oof_auc']:.4f} on {len(oof['rows']):,} labelled patches (per fold: {folds}); "
          f"each patch scored by the one model that never trained on it")


def predict_cache_rows(model, cache, rows, config, tta: bool, batch_size: int | None) -> np.ndarray:
    """TTA probabilities of cache rows (test or held-out), read from the memmap a chunk at a time."""
    from tqdm.auto import tqdm
    from trainables.train import predict_proba

    out = np.empty(len(rows), dtype=np.float32)
    with tqdm(total=len(rows), desc="predict", unit="img", leave=False) as bar:
        for start in range(0, len(rows), PREDICT_CHUNK):
            chunk = rows[start:start + PREDICT_CHUNK]
            out[start:start + len(chunk)] = predict_proba(model, cache.images[chunk], config, tta=tta, batch_size=batch_size)
            bar.update(len(chunk))
    return out


def report_test_auc(labels, probs, labels_from, run, out_dir: Path) -> float | None:
    """Print the test AUC; save the ROC curve beside the submission and log both to MLflow."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(labels)) < 2:
        print(f"test labels from {labels_from} hold one class only: no AUC")
        return None
    auc = float(roc_auc_score(labels, probs))
    print(f"test AUC {auc:.4f} on {len(labels):,} patches (labels from {labels_from})")
    from search.report import roc_figure

    fig = roc_figure(labels, probs, "refit", "Test ROC")
    fig.savefig(out_dir / "test_roc_curve.png", dpi=100)
    if run is not None:
        import mlflow
        mlflow.log_metric("test_auc", auc)
        mlflow.log_figure(fig, "test_roc_curve.png")
    return auc


# ---------------------------------------------------------------- CLI
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
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                   help="training and prediction precision (default: the search's, in its best_config.json; "
                        "auto = bf16 where this CPU has native bf16 and the model gains from it, else fp32)")
    return p


def check_args(args) -> None:
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
