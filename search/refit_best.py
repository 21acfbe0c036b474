"""Refit the best config of a search on all labelled data and write the Kaggle submission.

    python -m search.refit_best [--name NAME] [--epochs N] [--no-tta] [--test-labels CSV]

1. the best trial of search NAME (default: the newest) from <results>/<NAME>/best_config.json;
2. retrain its config on train + validation rows for the epoch count at which it peaked;
3. predict the test split with 8-view TTA -> <results>/<NAME>/submission.csv (validated, atomic);
4. save <results>/<NAME>/model.pt (atomic) and log an MLflow run under the search's experiment,
   with the model registered as ``pcam-<NAME>``;
5. with test labels (PCam HDF5 test split, --test-labels, or test_labels.csv beside
   sample_submission.csv) report the test AUC and log a ROC curve.

Being killed at any point leaves the previous model.pt/submission.csv (or none) intact; running the
command again redoes the refit and cleans up what the killed run left.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from datasets.cache import pid_alive
from datasets.errors import DataError, UserError, run_cli
from search import submission as sub
from search.report import write_json
from search.run import results_root

ROLE_TAG = "pcam_tune.role"  # as search.tracking's parent/trial runs; "refit" marks ours
PID_TAG = "pcam_tune.pid"  # lets a later refit tell a killed run from a live one
PREDICT_CHUNK = 4096  # test rows decoded from the memmap at a time (57k full test set would be 1.6 GB)


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
    if not exp or "://" in str(exp) or not Path(exp).is_dir():
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
    """The search's cache (reopened when still there, else rebuilt from its data_dir)."""
    from datasets.cache import open_cache, prepare_dataset

    cache_path = best.get("cache_path")
    if cache_path and Path(cache_path).is_dir() and cache_dir is None:
        try:
            cache = open_cache(cache_path)
        except DataError:
            cache = None  # a stale/partial cache: rebuild it below
        if cache is not None and cache.fingerprint == best.get("data_fingerprint", cache.fingerprint):
            return cache
    cache = prepare_dataset(data_dir=best.get("data_dir"), cache_dir=cache_dir, progress=True)
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
def refit(args) -> dict:
    results = results_root(args)
    best = find_best(results, args.name)
    name = best["name"]
    out_dir = results / name
    for final in (out_dir / "model.pt", out_dir / "submission.csv", out_dir / "refit.json"):
        for tmp in sub.clean_stale_tmp(final):
            print(f"removed {tmp.name}, left by an interrupted refit")

    cache = open_search_data(best, args.cache_dir)
    test_idx = cache.indices("test")
    ids = expected_test_ids(cache, test_idx) if len(test_idx) else None
    test_labels, labels_from = (None, None) if ids is None else find_test_labels(cache, test_idx, ids, args.test_labels)
    train_idx = labelled_rows(cache)
    config = refit_config(best, args)
    n_train = 0 if args.from_checkpoint else min(len(train_idx), config["max_train_samples"] or len(train_idx))

    with tracking_run(best, args, config, n_train) as run:
        if args.from_checkpoint:
            model, config = checkpoint_model(best)
        else:
            print(f"refit {name!r}: trial {best.get('trial_id')} (val AUC {best['best_val_auc']:.4f} at epoch "
                  f"{best['best_epoch']}) on {n_train:,} labelled patches for {config['epochs']} epoch(s), "
                  f"seed {config['seed']}", flush=True)
            model = train(config, cache, train_idx, run)
        probs = None if ids is None else predict_test(model, cache, test_idx, config, not args.no_tta, args.batch_size)
        summary = {"name": name, "trial_id": best.get("trial_id"), "from_checkpoint": bool(args.from_checkpoint),
                   "epochs": config["epochs"], "seed": config["seed"], "tta": not args.no_tta,
                   "n_train": int(n_train),
                   "model": str(out_dir / "model.pt"), "submission": None, "test_auc": None,
                   "test_labels": labels_from, "mlflow_run_id": run.info.run_id if run else None,
                   "mlflow_tracking_uri": mlflow_uri() if run else None}
        write_outputs(out_dir, model, config, ids, probs, summary)
        if test_labels is not None:
            summary["test_auc"] = report_test_auc(test_labels, probs, labels_from, run, out_dir)
        if run is not None:
            log_outputs(best, model, config, cache, test_idx if ids is not None else train_idx, summary)
        write_json(out_dir / "refit.json", summary)
    return summary


def mlflow_uri() -> str:
    """The store the refit's run is in (read while the run is open: tracking_run restores the caller's on exit)."""
    import mlflow

    return mlflow.get_tracking_uri()


def refit_config(best: dict, args) -> dict:
    """The trial's config for the refit: the peak epoch count (or --epochs), every row, --seed."""
    from trainables.train import resolve_config

    config = dict(best["config"])
    config["epochs"] = int(args.epochs or best["best_epoch"])
    # A search may subsample for speed; the refit uses every labelled row unless told otherwise.
    config["max_train_samples"] = args.max_train_samples
    if args.seed is not None:
        config["seed"] = args.seed
    try:
        return resolve_config(config)
    except UserError as e:
        raise UserError(f"{best['_path']}: {e}") from None


def train(config: dict, cache, train_idx: np.ndarray, run):
    from trainables.train import fit

    model, history = fit(config, cache, train_idx, val_idx=None, epochs=config["epochs"],
                         on_epoch=epoch_reporter(config["epochs"], run), progress=True)
    if history and history[-1].get("trial_status") == "diverged":
        raise UserError(f"the refit diverged at epoch {history[-1]['epoch']} (non-finite loss), nothing written: "
                        f"retry with another --seed, or rerun the search with a lower learning rate")
    return model


def checkpoint_model(best: dict) -> tuple:
    """--from-checkpoint: the best trial's own weights (trained on the train split only), no refit."""
    from trainables.models import build_model
    from trainables.train import load_checkpoint, CHECKPOINT_FILE

    folder = best.get("checkpoint_path")
    if not folder or not (Path(folder) / CHECKPOINT_FILE).is_file():
        raise UserError(f"the best trial's checkpoint {folder} is missing ({best['_path']}): "
                        f"refit without --from-checkpoint, or rerun `python -m search.run --name {best['name']}`")
    state = load_checkpoint(folder)
    cfg = state["config"]
    model = build_model(cfg["backbone"], pretrained=False, unfreeze_depth=cfg["unfreeze_depth"], dropout=cfg["dropout"])
    model.load_state_dict(state["model"])
    print(f"using the best trial's checkpoint {folder} (epoch {state['epoch']}), no refit")
    return model.eval(), cfg


def write_outputs(out_dir: Path, model, config, ids, probs, summary) -> None:
    """model.pt and submission.csv, each written to a temporary, checked, then renamed into place.

    The submission is validated before either file is touched, and the two renames run back to
    back, so a kill leaves the previous pair (or nothing) - never a truncated file.
    """
    from trainables.train import save_model

    model_path, submission_path = out_dir / "model.pt", out_dir / "submission.csv"
    tmp_model = sub.atomic_path(model_path)
    try:
        save_model(tmp_model, model, config)
        if ids is not None:
            sub.write_submission(submission_path, ids, probs)
            summary["submission"] = str(submission_path)
        os.replace(tmp_model, model_path)
    finally:
        tmp_model.unlink(missing_ok=True)
    if ids is None:
        print("no test split in this data (no test/ + sample_submission.csv): wrote the model only")
    else:
        print(f"wrote {submission_path} ({len(ids):,} rows, TTA {'on' if summary['tta'] else 'off'})")
    print(f"wrote {model_path}")


def predict_test(model, cache, test_idx, config, tta: bool, batch_size: int) -> np.ndarray:
    """TTA probabilities of the test rows, read from the memmap a chunk at a time."""
    from tqdm.auto import tqdm
    from trainables.train import predict_proba

    out = np.empty(len(test_idx), dtype=np.float32)
    with tqdm(total=len(test_idx), desc="predict test", unit="img", leave=False) as bar:
        for start in range(0, len(test_idx), PREDICT_CHUNK):
            rows = test_idx[start:start + PREDICT_CHUNK]
            out[start:start + len(rows)] = predict_proba(model, cache.images[rows], config, tta=tta, batch_size=batch_size)
            bar.update(len(rows))
    return out


def epoch_reporter(epochs: int, run):
    """fit's on_epoch callback: a line per epoch on the console, the metrics into the refit's MLflow run."""
    def on_epoch(metrics: dict, state, predictions) -> None:
        epoch = int(metrics.get("epoch", 0))
        print(f"epoch {epoch}/{epochs}  train_loss {metrics.get('train_loss', float('nan')):.4f}  "
              f"lr {metrics.get('lr', float('nan')):.3g}  {metrics.get('epoch_seconds', 0):.1f}s  "
              f"{metrics.get('images_per_s', 0):.0f} img/s", flush=True)
        if run is not None:
            import mlflow
            numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "epoch"}
            mlflow.log_metrics(numeric, step=epoch)
    return on_epoch


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


# ---------------------------------------------------------------- MLflow
class tracking_run:
    """Context manager: the refit's MLflow run (None with --no-mlflow), ended FAILED/KILLED on error."""

    def __init__(self, best, args, config, n_train):
        self.best, self.args, self.config, self.n_train = best, args, config, n_train
        self.run = None

    def __enter__(self):
        if self.args.no_mlflow:
            return None
        import mlflow
        from search.tracking import client, default_tracking_uri, experiment_id

        # The search's store unless told otherwise: the refit run sits beside the trials it came from.
        uri = self.args.tracking_uri or self.best.get("tracking_uri") or default_tracking_uri(results_root(self.args))
        # mlflow.set_tracking_uri also exports $MLFLOW_TRACKING_URI: put the caller's back on exit, so a later
        # search in the same process (a notebook, the tests) does not silently log into this store.
        self._caller_uri = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        exp_id = experiment_id(client(uri), self.best.get("mlflow_experiment") or self.best["name"])
        close_killed_refits(client(uri), exp_id)
        tags = {ROLE_TAG: "refit", PID_TAG: str(os.getpid()), "pcam_tune.search": self.best["name"],
                "pcam_tune.source_trial": str(self.best.get("trial_id"))}
        if self.best.get("child_run_id"):
            tags["pcam_tune.source_run_id"] = self.best["child_run_id"]
        self.run = mlflow.start_run(experiment_id=exp_id, run_name=f"{self.best['name']} (refit)", tags=tags)
        mlflow.log_params({**{k: "None" if v is None else v for k, v in self.config.items()},
                           "n_train": self.n_train, "tta": not self.args.no_tta,
                           "search_best_val_auc": self.best.get("best_val_auc"),
                           "search_best_epoch": self.best.get("best_epoch")})
        print(f"MLflow: run {self.run.info.run_id} in experiment {self.best.get('mlflow_experiment') or self.best['name']!r} at {uri}")
        return self.run

    def __exit__(self, exc_type, exc, tb):
        if self.run is not None:
            import mlflow
            mlflow.end_run("FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED"))
            mlflow.set_tracking_uri(self._caller_uri)
        return False


def close_killed_refits(mlf, exp_id: str) -> None:
    """Mark refit runs of dead processes (SIGKILL, power loss) KILLED, so the UI does not show them running."""
    runs = mlf.search_runs([exp_id], filter_string=f"tags.`{ROLE_TAG}` = 'refit' and attributes.status = 'RUNNING'")
    for r in runs:
        pid = r.data.tags.get(PID_TAG, "")
        if not (pid.isdigit() and pid_alive(int(pid))):
            mlf.set_terminated(r.info.run_id, status="KILLED")


def log_outputs(best, model, config, cache, example_rows, summary) -> None:
    """The submission and the model (registered as pcam-<name>) into the refit's run."""
    import mlflow

    if summary["submission"]:
        mlflow.log_artifact(summary["submission"])
    # From the CPU: a CUDA-pickled model would not load on a machine without a GPU. "pickle", not
    # MLflow 3's default "pt2": a torch.export graph cannot be switched to eval mode or driven by
    # predict_proba's 8-view TTA, and the registered model must reproduce the submission. Loading it
    # needs pcam-tune importable (the network's classes live in trainables.models).
    info = mlflow.pytorch.log_model(
        model.to("cpu").eval(), name="model", registered_model_name=f"pcam-{best['name']}",
        input_example=model_input_example(cache, example_rows[:4], config),
        serialization_format="pickle", pip_requirements=pinned_requirements(),
    )
    summary["registered_model"] = f"pcam-{best['name']}"
    summary["registered_version"] = getattr(info, "registered_model_version", None)
    summary["model_uri"] = info.model_uri
    mlflow.log_dict(summary, "refit.json")


def pinned_requirements() -> list[str]:
    """The model's pip requirements, given so MLflow skips its slow (~20 s) inference subprocess."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg).split('+')[0]}" for pkg in ("torch", "torchvision", "numpy", "mlflow")]


def model_input_example(cache, rows, config) -> np.ndarray:
    """A few real patches as the network takes them: uint8 NHWC -> float32 NCHW in [0, 1].

    The network normalises internally (trainables.models.PcamNet), so this is the whole contract
    of the registered model: logits out; sigmoid (and the 8-view mean) as in predict_proba.
    """
    import torch
    from trainables.train import to_input

    return to_input(torch.from_numpy(np.ascontiguousarray(cache.images[np.asarray(rows)])), config, aug=False).numpy()


# ---------------------------------------------------------------- CLI
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search.refit_best", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", help="search name (default: the most recent search under the results folder)")
    p.add_argument("--epochs", type=int, help="epochs to train (default: the epoch at which the best trial peaked)")
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
    p.add_argument("--batch-size", type=int, default=256, help="prediction batch size (default 256)")
    return p


@run_cli
def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    args = get_args_parser().parse_args(argv)
    for option in ("epochs", "max_train_samples", "batch_size"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise UserError(f"--{option.replace('_', '-')} {value}: must be at least 1")
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
