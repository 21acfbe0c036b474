"""`python -m search.run --space NAME`: Ray Tune + Optuna TPE + ASHA over a named space, tracked in MLflow.

Order of work, so that every mistake the user can fix costs seconds, not a Ray start:
options -> space/backbones -> pretrained weights -> data (decoded once into the cache, by the driver) ->
Ray -> MLflow parent -> Tuner (new or restored) -> leaderboard, best_config.json, pictures, mlflow command.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from datasets import defaults
from datasets.errors import UserError, run_cli
from search import cluster, insight, private_api, report, searcher, tracking, trial_runs
from search.outcome import MODE, OBJECTIVE
from search.spaces import SpaceOptions, define_by_run, get_space, list_spaces, pretrained_backbones_used, \
    resolve_backbones, searched_keys
from search.storage import check_storage_path, join as join_storage, uri_for

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def parse_duration(text: str | None) -> float | None:
    """'90', '90s', '30m', '1.5h', '1h30m' -> seconds; None/'' -> None (no budget)."""
    if text in (None, ""):
        return None
    s = str(text).strip().lower()
    if s.startswith("-"):
        raise UserError(f"--time-budget {text!r} is negative; give a positive duration like 600, 30m or 2h")
    if re.fullmatch(r"\d+(\.\d+)?", s):
        seconds = float(s)
    else:
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", s)
        if not parts or not any(parts.groups()):
            raise UserError(f"--time-budget {text!r} is not a duration; use seconds (600) or 30m, 2h, 1h30m")
        h, m, sec = (float(g or 0) for g in parts.groups())
        seconds = h * 3600 + m * 60 + sec
    if seconds <= 0:
        raise UserError(f"--time-budget {text!r} must be more than zero")
    return seconds


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line like every other user error, not usage + message
        raise UserError(f"{message} (see python -m search.run --help)")


def get_args_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(
        prog="python -m search.run",
        description="Hyperparameter search for PCam patch classifiers: Ray Tune + Optuna TPE + ASHA, MLflow tracking.")
    p.add_argument("--space", help="named search space (see --list-spaces)")
    p.add_argument("--list-spaces", action="store_true", help="list the search spaces and exit")
    p.add_argument("--data-dir", help="Kaggle folder or PCam HDF5 folder (default: the embedded synthetic data)")
    p.add_argument("--slide-map", help="csv id,slide: validate by whole-slide image, not by patch (default: "
                   "DATA_DIR/slide_map.csv if present; python -m datasets.slide_map builds one)")
    p.add_argument("--num-samples", type=int, help="number of trials (default: per space)")
    p.add_argument("--max-epochs", type=int, help="epochs of a trial that ASHA never stops (default: per space)")
    p.add_argument("--time-budget", help="stop the search after this long: seconds, or 30m, 2h, 1h30m")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (default: from the hardware)")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs per trial, fractional allowed e.g. 0.25 "
                   "(default: 0.5 when GPUs exist, else 0)")
    p.add_argument("--max-concurrent", type=int, help="trials running at once (default: what the resources fit)")
    p.add_argument("--name", help="experiment name (default: <space>-<date>-<time>); re-using a name resumes it")
    p.add_argument("--resume", action="store_true",
                   help="continue the experiment --name (or the newest one of --space) after Ctrl-C or a crash")
    p.add_argument("--address", help="run on an existing Ray cluster: auto, or the head's HOST:6379 (default "
                   "$RAY_ADDRESS, as set by `ray job submit`; Ray Client ray:// addresses are refused)")
    p.add_argument("--storage-path", help="where Ray keeps the experiment (default <results>/ray); on a "
                   "multi-node cluster use shared storage (NFS path) or an object store URI (s3://, gs://)")
    p.add_argument("--tracking-uri", help="MLflow store (default $MLFLOW_TRACKING_URI, else "
                   "sqlite:///<results>/mlflow.db)")
    p.add_argument("--study-storage", help="Optuna storage of the TPE study, named after the search (default "
                   "sqlite:///<results>/optuna.db; view it live with optuna-dashboard)")
    p.add_argument("--seed", type=int, help="seed of the TPE sampler and of the trials (default 0)")
    p.add_argument("--backbones", help="comma-separated backbones to choose from (backbones/baseline spaces)")
    p.add_argument("--backbone", help="the backbone to fine-tune (finetune space)")
    p.add_argument("--no-pretrained", action="store_true", help="train every backbone from scratch")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                   help="trial precision (default auto: bf16 + channels_last where this CPU has native bf16 and the "
                        "model gains from it, else fp32; see docs/training.md)")
    p.set_defaults(pretrained=None)
    p.add_argument("--grace-period", type=int, help="ASHA: epochs every trial gets before it can be stopped")
    p.add_argument("--reduction-factor", type=float, help="ASHA: keep the top 1/this at each rung")
    p.add_argument("--stock-feedback", action="store_true", help=argparse.SUPPRESS)  # Ray's OptunaSearch (bench)
    p.add_argument("--results-dir", help="results root (default $PCAM_TUNE_RESULTS, else ./results)")
    p.add_argument("--cache-dir", help="decode-once cache root (default $PCAM_TUNE_CACHE, else ~/.cache/pcam-tune)")
    p.add_argument("--top-k", type=int, default=report.TOP_K, help="leaderboard rows printed (default 10)")
    return p


@dataclass
class Plan:
    """Everything decided before Ray starts."""

    args: argparse.Namespace
    space: object
    opts: SpaceOptions
    backbones: tuple
    num_samples: int
    max_epochs: int
    grace_period: int
    reduction_factor: float
    time_budget_s: float | None
    cpus_per_trial: float
    gpus_per_trial: float
    max_concurrent: int
    name: str
    results_dir: Path
    storage_path: str
    experiment_path: str
    resume: bool
    tracking_uri: str
    study_storage: str
    interrupted: bool = False  # a Ctrl-C ended the search (exit code 130)
    unfinished: int = 0  # trials left for --resume (Ctrl-C or time budget)


def _positive(value, option: str, allow_zero: bool = False):
    if value is not None and (value < 0 or (value == 0 and not allow_zero) or
                              (isinstance(value, float) and not math.isfinite(value))):
        raise UserError(f"{option} {value} must be {'zero or more' if allow_zero else 'more than zero'}")
    return value


def local_hardware() -> tuple[int, int]:
    """(CPUs usable by this process, CUDA GPUs). device_count() uses NVML and creates no CUDA context."""
    cpus = defaults.usable_cpus()
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:
        gpus = 0
    return cpus, gpus


def resource_defaults(args, cpus: int, gpus: int, num_samples: int, where: str = "this machine"
                      ) -> tuple[float, float, int]:
    """cpus/gpus per trial and concurrency: share GPUs two trials each (96 px nets leave a GPU idle), and give
    each trial an equal slice of the CPUs (data feeding) without exceeding what the machine has."""
    gpt = args.gpus_per_trial if args.gpus_per_trial is not None else (0.5 if gpus else 0.0)
    if gpt > gpus:
        raise UserError(f"--gpus-per-trial {gpt} but {where} has {gpus} GPU(s); "
                        f"use at most {gpus}{' (or 0 for CPU)' if gpus else ' (train on CPU)'}")
    if gpt > 1 and gpt != int(gpt):
        raise UserError(f"--gpus-per-trial {gpt}: above 1 it must be a whole number of GPUs")
    slots = int(gpus // gpt) if gpt else None
    if args.max_concurrent is not None:
        conc = args.max_concurrent
    elif slots:
        conc = max(1, slots)
    else:
        cpt0 = args.cpus_per_trial or (1 if cpus <= 4 else 2)
        conc = max(1, int(cpus // cpt0))
    conc = max(1, min(conc, num_samples))
    cpt = args.cpus_per_trial if args.cpus_per_trial is not None else max(1, cpus // conc)
    if cpt > cpus:
        raise UserError(f"--cpus-per-trial {cpt} but {where} has {cpus} CPU(s)")
    return float(cpt), float(gpt), conc


def results_root(args) -> Path:
    """The results root of these CLI args (the rule is datasets.defaults')."""
    return defaults.results_root(args.results_dir)


def _is_uri(path: str) -> bool:
    return "://" in path


def _newest_experiment(storage_path: str, space: str | None) -> str | None:
    if _is_uri(storage_path) or not Path(storage_path).is_dir():
        return None
    runs = [p for p in Path(storage_path).iterdir()
            if (p / "tuner.pkl").is_file() and (space is None or p.name.startswith(f"{space}-"))]
    return max(runs, key=lambda p: p.stat().st_mtime).name if runs else None


SETTINGS_FILE = "search.json"
# Settings a resumed search takes from its first run (the Ray state already holds the searcher, scheduler and
# trial configs built from them); CLI values for these are ignored on resume.
RESUMED_SETTINGS = ("space", "backbones", "pretrained", "backbone", "num_samples", "max_epochs", "grace_period",
                    "reduction_factor", "time_budget", "seed", "data_dir", "slide_map", "tracking_uri", "max_concurrent",
                    "study_storage", "precision")


def _load_settings(results: Path, name: str) -> dict | None:
    path = results / name / SETTINGS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _apply_saved_settings(args, saved: dict) -> None:
    """Resume with the settings the search started with; a different --space or --data-dir is an error."""
    for key, option in (("space", "--space"), ("data_dir", "--data-dir"), ("slide_map", "--slide-map")):
        given = getattr(args, key)
        if given is not None and saved.get(key) is not None and \
                (Path(given).resolve() != Path(saved[key]) if key != "space" else given != saved[key]):
            raise UserError(f"search {args.name!r} was started with {option} {saved[key]}; resume it with that "
                            f"(or drop {option}), or start a new search with another --name")
    ignored = [k for k in RESUMED_SETTINGS if k not in ("space", "data_dir", "slide_map") and getattr(args, k) is not None
               and getattr(args, k) not in (False, saved.get(k))]
    if ignored:
        print(f"note: resuming {args.name!r} with its original settings; ignoring "
              + ", ".join("--" + k.replace("_", "-") for k in ignored), flush=True)
    for k in RESUMED_SETTINGS:
        setattr(args, k, saved.get(k))


def make_plan(argv=None) -> Plan | None:
    args = get_args_parser().parse_args(argv)
    if args.list_spaces:
        print(list_spaces())
        return None
    args.address = cluster.cluster_address(args.address, sys.argv[1:] if argv is None else argv)
    results = results_root(args)
    storage = args.storage_path or str(results / "ray")
    if not _is_uri(storage):
        storage = str(Path(storage).resolve())
    check_storage_path(storage)
    cluster.check_job_paths(results_dir=results, storage_path=storage)
    if args.space:
        get_space(args.space)  # an unknown space fails first, whatever else is wrong
    if args.resume and not args.name:
        args.name = _newest_experiment(storage, args.space)
        if not args.name:
            raise UserError(f"--resume: no {args.space or ''} experiment found under {storage}; pass --name NAME")
    if args.name and not NAME_RE.match(args.name):
        raise UserError(f"--name {args.name!r}: use letters, digits, '.', '_' or '-' (up to 100 characters)")
    from ray import tune

    resume = bool(args.name) and tune.Tuner.can_restore(join_storage(storage, args.name))
    if args.resume and not resume:
        raise UserError(f"--resume: nothing to resume at {join_storage(storage, args.name)}; "
                        "drop --resume to start a new search")
    saved = _load_settings(results, args.name) if resume else None
    if saved:
        _apply_saved_settings(args, saved)
    args.seed = 0 if args.seed is None else args.seed
    if not args.space:
        raise UserError("--space is required; one of: " + ", ".join(_space_names()) + " (see --list-spaces)")
    space = get_space(args.space)
    for opt in ("num_samples", "max_epochs", "grace_period", "max_concurrent"):
        _positive(getattr(args, opt), "--" + opt.replace("_", "-"))
    _positive(args.cpus_per_trial, "--cpus-per-trial")
    _positive(args.gpus_per_trial, "--gpus-per-trial", allow_zero=True)
    if args.reduction_factor is not None and args.reduction_factor <= 1:
        raise UserError(f"--reduction-factor {args.reduction_factor} must be more than 1 (e.g. 2 or 3)")
    time_budget_s = parse_duration(args.time_budget)
    max_epochs = args.max_epochs or space.max_epochs
    grace = args.grace_period or min(space.grace_period, max_epochs)
    if grace > max_epochs:
        raise UserError(f"--grace-period {grace} is more than --max-epochs {max_epochs}")
    num_samples = args.num_samples or space.num_samples
    if isinstance(args.backbones, str):
        args.backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    args.pretrained = not args.no_pretrained if args.pretrained is None else args.pretrained
    opts = SpaceOptions(backbones=tuple(args.backbones) if args.backbones else None, pretrained=args.pretrained,
                        backbone=args.backbone, max_epochs=max_epochs, seed=args.seed,
                        precision=args.precision or "auto")
    backbones = resolve_backbones(space, opts)
    check_weights(space, backbones, opts)

    # On a cluster the resources are only known once connected (start_ray); locally check them now.
    cpt, gpt, conc = (0.0, 0.0, 0) if args.address else resource_defaults(args, *local_hardware(), num_samples)
    name = args.name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Plan(args=args, space=space, opts=opts, backbones=backbones, num_samples=num_samples,
                max_epochs=max_epochs, grace_period=grace,
                reduction_factor=args.reduction_factor or space.reduction_factor, time_budget_s=time_budget_s,
                cpus_per_trial=cpt, gpus_per_trial=gpt, max_concurrent=conc, name=name, results_dir=results,
                storage_path=storage, experiment_path=join_storage(storage, name), resume=resume,
                tracking_uri=defaults.default_tracking_uri(results, args.tracking_uri),
                study_storage=args.study_storage or searcher.study_storage_url(results))


def save_settings(plan: Plan, data_fingerprint: str) -> None:
    a = plan.args
    settings = {"space": plan.space.name, "backbones": list(a.backbones) if a.backbones else None,
                "pretrained": plan.opts.pretrained, "backbone": a.backbone, "num_samples": plan.num_samples,
                "max_epochs": plan.max_epochs, "grace_period": plan.grace_period,
                "reduction_factor": plan.reduction_factor, "time_budget": a.time_budget, "seed": a.seed,
                "data_dir": str(Path(a.data_dir).resolve()) if a.data_dir else None,
                "slide_map": str(Path(a.slide_map).resolve()) if a.slide_map else None,
                "data_fingerprint": data_fingerprint, "tracking_uri": plan.tracking_uri,
                "study_storage": plan.study_storage,
                "max_concurrent": plan.max_concurrent,  # fixed in the restored TuneConfig
                "precision": plan.opts.precision,
                "experiment_path": plan.experiment_path}
    report.write_json(plan.results_dir / plan.name / SETTINGS_FILE, settings)


def _space_names():
    from search.spaces import SPACES

    return list(SPACES)


def check_weights(space, backbones, opts) -> None:
    """Before Ray starts: download the missing pretrained weights of the space's backbones once, here in the
    driver (trials then find them in the cache), and stop with the ways out when a download fails."""
    needed = pretrained_backbones_used(space, backbones, opts)
    if not needed:
        return
    from trainables.weights import MIRROR_ENV, download_error, download_missing

    missing = download_missing(needed, progress=True)
    if not missing:
        return
    files = "; ".join(f"{b}: {f} (expected at {p})" for b, f, p, _ in missing)
    have = [b for b in backbones if b not in {m[0] for m in missing}]
    raise UserError(
        f"pretrained weights missing for {len(missing)} backbone(s) and the download failed "
        f"({download_error(missing[0][3])}): {files}. Ways out: "
        f"(1) import a downloaded file: python -m trainables.weights import FILE --backbone NAME "
        f"(or set ${MIRROR_ENV} to a mirror of torchvision's weight files); "
        f"(2) restrict the search: --backbones {','.join(have) or 'baseline_bn'}; "
        f"(3) train from scratch: --no-pretrained")


def build_tuner(plan: Plan, trainable, parent_run_id: str):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    callbacks = [searcher.SchedulerStopMarker(plan.max_epochs),  # first: the others read its mark
                 trial_runs.MlflowTrialCallback(plan.tracking_uri, plan.name, parent_run_id, plan.max_epochs)]
    if plan.resume:
        # Searcher (TPE study), scheduler (ASHA rungs), trials and the callback come back from the experiment
        # state; finished trials are not re-run, unfinished ones continue from their latest checkpoint.
        tuner = tune.Tuner.restore(plan.experiment_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        # The restored RunConfig carries the reporter pickled by the first run; use this version's.
        run_config = private_api.restored_run_config(tuner)
        if run_config is not None:
            run_config.progress_reporter = make_reporter(plan)
        return tuner
    if searcher.study_exists(plan.study_storage, plan.name):
        raise UserError(f"an Optuna study named {plan.name!r} already exists in {plan.study_storage} but its Ray "
                        f"experiment {plan.experiment_path} is gone; start with another --name, or delete the study: "
                        f"optuna delete-study --storage {plan.study_storage} --study-name {plan.name}")
    search_alg = searcher.make_searcher(
        define_by_run(plan.space, plan.backbones, plan.opts), seed=plan.args.seed, num_samples=plan.num_samples,
        max_t=plan.max_epochs, feedback=not plan.args.stock_feedback,
        storage_url=plan.study_storage, study_name=plan.name)
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=plan.max_epochs,
                              grace_period=plan.grace_period, reduction_factor=plan.reduction_factor)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=OBJECTIVE, mode=MODE, search_alg=search_alg, scheduler=scheduler,
                                    num_samples=plan.num_samples, max_concurrent_trials=plan.max_concurrent,
                                    time_budget_s=plan.time_budget_s),
        run_config=tune.RunConfig(
            name=plan.name, storage_path=plan.storage_path, callbacks=callbacks,
            # Keep the best epoch's checkpoint (the model the objective describes; Ray keeps the latest too).
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_auc",
                                                    checkpoint_score_order=MODE),
            # Errors in a trial are recorded and the search goes on; on a cluster, retry a trial whose node
            # died (from its checkpoint) before calling it failed.
            failure_config=tune.FailureConfig(max_failures=2 if plan.args.address else 0, fail_fast=False),
            progress_reporter=make_reporter(plan),
            verbose=1),
    )


def make_reporter(plan: Plan):
    from ray import tune

    # No sort_by_metric: Ray sorts with None for trials cut before reporting and crashes.
    return tune.CLIReporter(
        metric_columns={"epoch": "epoch", "val_auc": "val_auc", OBJECTIVE: "best", "val_loss": "val_loss",
                        "train_loss": "train_loss", "trial_status": "status"},
        parameter_columns=table_columns(plan), max_report_frequency=15)


def table_columns(plan: Plan) -> list[str]:
    """The searched keys of this space, for the live table (CLIReporter fails on a key a config lacks,
    and conditional keys such as unfreeze_depth are always present, as None when not drawn)."""
    return searched_keys(plan.space, plan.backbones, plan.opts)


def start_ray(plan: Plan) -> None:
    import ray

    if not ray.is_initialized():
        kwargs = {"address": plan.args.address} if plan.args.address else {}
        # Trial stdout stays in the trial folders: the live table is the driver's output, and a trial's
        # error still reaches the table, the leaderboard and MLflow.
        ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False, **kwargs)
    if plan.args.address:  # only now can a cluster's resources be known and checked
        plan.cpus_per_trial, plan.gpus_per_trial, plan.max_concurrent = cluster.trial_resources(
            plan.args, cluster.alive_nodes(), plan.num_samples, where=f"the Ray cluster at {plan.args.address}")


def check_nodes(plan: Plan, cache, data_dir: str | None) -> None:
    """On a cluster, every node that may get a trial must see the cache, the weights and the storage path."""
    if plan.args.address:
        hosts = cluster.trial_hosts(cluster.alive_nodes(), plan.cpus_per_trial, plan.gpus_per_trial)
        cluster.preflight(hosts, cluster.Needs(
            cache_path=str(cache.path), fingerprint=cache.fingerprint, storage_path=plan.storage_path,
            pretrained=tuple(pretrained_backbones_used(plan.space, plan.backbones, plan.opts)), data_dir=data_dir))


def make_trainable(plan: Plan, cache_path: str):
    from ray import tune

    from trainables.train import train_pcam

    # The path (not the arrays) goes to the trials: each worker memory-maps the decode-once cache.
    return tune.with_resources(tune.with_parameters(train_pcam, cache_path=cache_path),
                               {"cpu": plan.cpus_per_trial, "gpu": plan.gpus_per_trial})


def _set_env() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic live table, with our columns
    # One small checkpoint per epoch forces a state snapshot each time; that is intended here, not a warning.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def run_search(plan: Plan, progress: bool = True) -> dict:
    """Run (or resume) the search; returns the best_config record."""
    from datasets.cache import prepare_dataset

    from datasets.splits import PATCH_WARNING, validation_kind

    cache = prepare_dataset(plan.args.data_dir, plan.args.cache_dir, progress=progress,  # DataError: one line
                            slide_map=plan.args.slide_map)
    data_dir = str(Path(plan.args.data_dir).resolve()) if plan.args.data_dir else None
    validation = validation_kind(cache)
    if validation == "patch":
        print(PATCH_WARNING, file=sys.stderr, flush=True)
    saved = _load_settings(plan.results_dir, plan.name) if plan.resume else None
    if saved and saved.get("data_fingerprint") not in (None, cache.fingerprint):
        raise UserError(f"the data of search {plan.name!r} ({data_dir or 'embedded synthetic'}) changed since it "
                        f"started (fingerprint {saved['data_fingerprint'][:12]} -> {cache.fingerprint[:12]}); "
                        "start a new search with another --name")
    out_dir = plan.results_dir / plan.name
    out_dir.mkdir(parents=True, exist_ok=True)
    start_ray(plan)
    check_nodes(plan, cache, data_dir)
    params = {"space": plan.space.name, "backbones": ",".join(plan.backbones), "pretrained": plan.opts.pretrained,
              "num_samples": plan.num_samples, "max_epochs": plan.max_epochs,
              "time_budget_s": plan.time_budget_s, "scheduler": "ASHA", "grace_period": plan.grace_period,
              "reduction_factor": plan.reduction_factor,
              "searcher": "OptunaSearch TPE" + (" (Ray's stock feedback)" if plan.args.stock_feedback
                                                else " (outcome feedback)"),
              "objective": f"{OBJECTIVE} (best val AUC up to the epoch reached)", "study_storage": plan.study_storage,
              "seed": plan.args.seed, "data_dir": data_dir or "embedded synthetic",
              "slide_map": str(Path(plan.args.slide_map).resolve()) if plan.args.slide_map else None,
              "data_fingerprint": cache.fingerprint, "cache_path": str(cache.path),
              "cpus_per_trial": plan.cpus_per_trial, "gpus_per_trial": plan.gpus_per_trial,
              "max_concurrent": plan.max_concurrent}
    if not saved:
        save_settings(plan, cache.fingerprint)
    print(f"{'resuming' if plan.resume else 'starting'} search {plan.name!r}: space {plan.space.name}, "
          f"backbones {','.join(plan.backbones)}, {plan.num_samples} trials x <= {plan.max_epochs} epochs, "
          f"{plan.max_concurrent} at once ({plan.cpus_per_trial:g} CPU, {plan.gpus_per_trial:g} GPU each), "
          f"data {cache.source.get('kind')} {cache.fingerprint[:12]}", flush=True)

    parent_run_id, _ = tracking.open_parent_run(plan.tracking_uri, plan.name, plan.experiment_path, params,
                                                tags={"validation": validation})
    tuner = build_tuner(plan, make_trainable(plan, str(cache.path)), parent_run_id)
    started = time.monotonic()
    grid, interrupted = private_api.fit_watching_ctrl_c(tuner)
    # Ray counts the budget across resumes, so a resumed search may hit it at once: any budget counts.
    budget_hit = bool(plan.time_budget_s) and (plan.resume or time.monotonic() - started >= 0.98 * plan.time_budget_s)
    unfinished = report.unfinished_trials(plan.experiment_path)
    summaries = report.summarize(grid, plan.max_epochs, budget_hit=budget_hit, interrupted=interrupted,
                                 unfinished=unfinished)
    # What Ray's hooks never saw (time-budget cuts, Ctrl-C), settled in MLflow and in the study from the same
    # outcomes the leaderboard shows.
    tracking.reconcile_children(plan.tracking_uri, plan.name, parent_run_id,
                                {s.trial_id: s.outcome for s in summaries})
    if not plan.args.stock_feedback:
        searcher.settle_study(plan.study_storage, plan.name,
                              {s.trial_id: (s.outcome, s.last_result) for s in summaries}, search_over=not interrupted)
    for s in summaries:  # Ray names checkpoints inside its filesystem: keep the storage URI for later readers
        s.checkpoint_path = uri_for(s.checkpoint_path, plan.storage_path)
    plan.interrupted, plan.unfinished = interrupted, len(unfinished)
    return finish(plan, summaries, cache, data_dir, parent_run_id, out_dir)


def finish(plan: Plan, summaries, cache, data_dir, parent_run_id, out_dir: Path) -> dict:
    from datasets.splits import validation_kind

    board = report.leaderboard(summaries)
    board_path = out_dir / "leaderboard.csv"
    board.to_csv(board_path, index=False)
    interrupted = plan.interrupted
    resume_hint = f"continue it with: python -m search.run --name {plan.name} --resume"
    print("\n" + report.format_leaderboard(board, plan.args.top_k))
    ranked = [s for s in summaries if s.outcome.ranked and not math.isnan(s.best_val_auc)]
    if not ranked:
        tracking.finish_parent(plan.tracking_uri, parent_run_id, metrics={"n_trials": len(summaries)},
                               tags={"outcome": "no trial reported"}, artifacts=[board_path],
                               status="KILLED" if interrupted else "FAILED")
        if interrupted:
            print(f"search interrupted before any epoch finished; {resume_hint}")
            return {}
        first = next((s.status for s in summaries if s.error), "no trial reported a result")
        raise UserError(f"no trial of {plan.name} finished an epoch ({first}); see {board_path}")
    best = ranked[0]
    child = _child_run_id(plan, parent_run_id, best.trial_id)
    record = report.best_config_record(
        best, name=plan.name, space=plan.space.name, experiment_path=plan.experiment_path, data_dir=data_dir,
        slide_map=str(Path(plan.args.slide_map).resolve()) if plan.args.slide_map else None,
        validation=validation_kind(cache),
        cache_path=str(cache.path), data_fingerprint=cache.fingerprint, tracking_uri=plan.tracking_uri,
        parent_run_id=parent_run_id, child_run_id=child)
    best_path = out_dir / "best_config.json"
    report.write_json(best_path, record)
    explained = insight.explain_search(plan.study_storage, plan.name, out_dir,  # Optuna's plots, importances
                                       n_startup=searcher.startup_trials(plan.num_samples))
    pictures = [report.plot_roc(best, out_dir / "roc_best.png"),
                report.plot_learning_curves(summaries, out_dir / "learning_curves.png"), *explained.pictures]
    kinds = [s.outcome.kind for s in summaries]
    counts = {"n_trials": len(summaries), "n_completed": kinds.count("completed"),
              "n_stopped_by_asha": kinds.count("stopped"), "n_cut_by_budget": kinds.count("budget"),
              "n_diverged": kinds.count("diverged"), "n_errored": kinds.count("errored")}
    tracking.finish_parent(
        plan.tracking_uri, parent_run_id,
        metrics={"best_val_auc": best.best_val_auc, "best_epoch": best.best_epoch, **counts,
                 **{f"importance_{k}": v for k, v in explained.importances.items()}},
        tags={"best_trial_id": best.trial_id, "best_child_run_id": child or "",
              "best_backbone": best.config.get("backbone")},
        artifacts=[board_path, best_path, *pictures], status="KILLED" if interrupted else "FINISHED")
    print(f"\nbest: trial {best.trial_id} val_auc {best.best_val_auc:.4f} at epoch {best.best_epoch} "
          f"({best.status})\nleaderboard: {board_path}\nbest config: {best_path}\n{explained.summary()}")
    if interrupted:
        print(f"search interrupted with {plan.unfinished} trial(s) unfinished; {resume_hint}")
    elif plan.unfinished:  # Ray counts the budget across resumes: a spent budget is the end of this search
        print(f"time budget reached: {plan.unfinished} trial(s) cut short")
    views = tracking.link_search_views(plan.tracking_uri, plan.name, parent_run_id)
    print(f"compare the trials in MLflow (experiment {plan.name!r}):\n  {tracking.ui_command(plan.tracking_uri)}\n"
          f"  then open {views['runs']}\n  (the parent run's description links the trials' learning curves side by side)")
    return record


def _child_run_id(plan: Plan, parent_run_id: str, trial_id: str) -> str | None:
    mlf = tracking.client(plan.tracking_uri)
    runs = tracking.child_runs(mlf, tracking.experiment_id(mlf, plan.name), parent_run_id)
    return runs[trial_id].info.run_id if trial_id in runs else None


@run_cli
def main(argv=None) -> int:
    _set_env()
    plan = make_plan(argv)
    if plan is None:
        return 0
    run_search(plan)
    return 130 if plan.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
