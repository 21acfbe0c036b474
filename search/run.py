"""`python -m search.run --space NAME`: Ray Tune + Optuna TPE + ASHA over a named space, tracked in MLflow.

The command line and the order of the phases, each in its own module:
options, checked into a Plan (search.plan, search.resources, search.settings for --resume) -> data (decoded once
into the cache, by the driver) -> Ray and the Tuner, new or restored (search.tuner; live table: search.live_table)
-> MLflow parent (search.tracking; children: search.trial_runs) -> fit, Ctrl-C told apart
(search.private_api.fit_watching_ctrl_c) -> leaderboard, best_config.json, pictures, mlflow command (here).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from datasets import defaults
from datasets.errors import UserError, renamed_option, run_cli
from datasets.files import atomic_path
from search import error_bars, holdout, insight, private_api, report, searcher, tracking
from search.outcome import OBJECTIVE, what_to_change
from search.plan import Plan, plan_search
from search.settings import SPACE_COPY, load_settings, save_settings
from search.spaces import list_spaces
from search.storage import uri_for
from search.tuner import build_tuner, check_nodes, make_trainable, prune_checkpoints, start_ray


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line like every other user error, not usage + message
        raise UserError(f"{message} (see python -m search.run --help)")


def get_args_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(
        prog="python -m search.run",
        description="Hyperparameter search for PCam patch classifiers: Ray Tune + Optuna TPE + ASHA, MLflow tracking.")
    p.add_argument("--space", help="named search space (see --list-spaces)")
    p.add_argument("--space-file", help="your own search space, a YAML file (format: docs/search.md, 'Your own "
                   "space'); kept with the search for --resume")
    p.add_argument("--list-spaces", action="store_true", help="list the search spaces and exit")
    p.add_argument("--data-dir", help="Kaggle folder or PCam HDF5 folder (default: the embedded synthetic data)")
    p.add_argument("--slide-map", help="csv id,slide: validate by whole-slide image, not by patch (default: "
                   "DATA_DIR/slide_map.csv if present; python -m datasets.slide_map builds one)")
    p.add_argument("--num-samples", type=int, help="number of trials (default: per space)")
    p.add_argument("--max-epochs", type=int, help="epochs of a trial that ASHA never stops (default: per space)")
    p.add_argument("--time-budget", help="stop the search after this long: seconds, or 30m, 2h, 1h30m, '1 day' "
                   "(pandas.Timedelta); without "
                   "--num-samples it proposes trials until the budget runs out")
    p.add_argument("--warm-start", help="start TPE from the trials of an earlier search NAME (same space file)")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (default: from the hardware)")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs per trial, fractional allowed e.g. 0.25 "
                   "(default: 0.5 when GPUs exist, else 0)")
    p.add_argument("--max-concurrent", type=int, help="trials running at once (default: what the resources fit)")
    p.add_argument("--name", help="experiment name (default: <space>-<date>-<time>); re-using a name resumes it")
    p.add_argument("--resume", action="store_true",
                   help="continue the experiment --name (or the newest one of the space) after Ctrl-C or a crash")
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
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                   help="trial precision (default auto: bf16 + channels_last where this CPU/GPU has native bf16 and the "
                        "model gains from it, fp16 + a gradient scaler on older GPUs, else fp32; see docs/training.md)")
    p.set_defaults(pretrained=None)
    p.add_argument("--grace-period", type=int, help="ASHA: epochs every trial gets before it can be stopped")
    p.add_argument("--reduction-factor", type=float, help="ASHA: keep the top 1/this at each rung")
    p.add_argument("--stock-feedback", action="store_true", help=argparse.SUPPRESS)  # Ray's OptunaSearch (bench)
    p.add_argument("--results-dir", help="results root (default $PCAM_TUNE_RESULTS, else ./results)")
    p.add_argument("--cache-dir", help="decode-once cache root (default $PCAM_TUNE_CACHE, else ~/.cache/pcam-tune)")
    p.add_argument("--leaderboard-rows", type=int, default=report.TOP_K, metavar="N", help="leaderboard rows printed (default 10)")
    p.add_argument("--top-k", type=int, dest="leaderboard_rows", action=renamed_option("--leaderboard-rows"), help=argparse.SUPPRESS)
    p.add_argument("--holdout", type=float, metavar="FRACTION",
                   help=f"labelled patches set aside that no trial trains or validates on, by slide when slides are "
                        f"known (default {holdout.DEFAULT_FRACTION}; 0 = none); the top trials' best checkpoints are "
                        f"scored on them at the end (holdout_auc with a 95 %% interval)")
    p.add_argument("--holdout-top", type=int, default=holdout.DEFAULT_TOP, metavar="K",
                   help=f"how many of the top trials are scored on the holdout (default {holdout.DEFAULT_TOP})")
    return p


def make_plan(argv=None) -> Plan | None:
    """The command line parsed and checked into a Plan (search.plan); None after --list-spaces."""
    args = get_args_parser().parse_args(argv)
    if args.list_spaces:
        print(list_spaces())
        return None
    return plan_search(args, argv)


def results_root(args) -> Path:
    """The results root of these CLI args (the rule is datasets.defaults')."""
    return defaults.results_root(args.results_dir)


def _set_env() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic live table, with our columns
    tracking.quiet_artifact_bars()
    # One small checkpoint per epoch forces a state snapshot each time; that is intended here, not a warning.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def run_search(plan: Plan, progress: bool = True) -> dict:
    """Run (or resume) the search; returns the best_config record."""
    from datasets.cache import prepare_dataset

    from datasets.splits import PATCH_WARNING, validation_kind

    cache = prepare_dataset(plan.args.data_dir, plan.args.cache_dir, progress=progress,  # DataError: one line
                            slide_map=plan.args.slide_map)
    data_dir = str(Path(plan.args.data_dir).resolve()) if plan.args.data_dir else None
    if plan.space.cached_features:  # the frozen backbones' features, once, before any trial (trainables.embeddings)
        from trainables.embeddings import ensure_embeddings

        for b in plan.backbones:
            ensure_embeddings(cache, {"backbone": b, "pretrained": plan.opts.pretrained, "unfreeze_depth": 0,
                                      "precision": plan.opts.precision}, progress=progress)
    validation = validation_kind(cache)
    if validation == "patch":
        print(PATCH_WARNING, file=sys.stderr, flush=True)
    saved = load_settings(plan.results_dir, plan.name) if plan.resume else None
    if saved and saved.get("data_fingerprint") not in (None, cache.fingerprint):
        raise UserError(f"the data of search {plan.name!r} ({data_dir or 'embedded synthetic'}) changed since it "
                        f"started (fingerprint {saved['data_fingerprint'][:12]} -> {cache.fingerprint[:12]}); "
                        "start a new search with another --name")
    out_dir = plan.results_dir / plan.name
    out_dir.mkdir(parents=True, exist_ok=True)
    # Before Ray (a UserError is one line); the fraction used is what search.json keeps for --resume.
    plan.args.holdout, holdout_rows, note = holdout.choose(cache, plan.args.holdout, plan.args.seed)
    if note:  # a warning on stderr (as the patch-validation one), a note with the rest of the story on stdout
        print(note, file=sys.stderr if note.startswith("warning") else sys.stdout, flush=True)
    start_ray(plan)
    check_nodes(plan, cache, data_dir)
    params = {"space": plan.space.name, "space_file": None if plan.space.built_in else plan.space.source,
              "space_sha256": plan.space.sha256[:12], "backbones": ",".join(plan.backbones),
              "pretrained": plan.opts.pretrained,
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
              "max_concurrent": plan.max_concurrent, "warm_start": plan.warm_start["name"] if plan.warm_start else None,
              "holdout": plan.args.holdout, "holdout_n": len(holdout_rows)}
    if plan.warm_start and plan.warm_start.get("data_fingerprint") != cache.fingerprint:
        theirs = plan.warm_start
        print(f"warning: --warm-start {theirs['name']} searched other data (fingerprint "
              f"{str(theirs.get('data_fingerprint'))[:12]}, {theirs.get('data_dir') or 'embedded synthetic'})"
              f" than this search ({cache.fingerprint[:12]}, {data_dir or 'embedded synthetic'}); its results guide TPE "
              "all the same", file=sys.stderr, flush=True)
    if not saved:
        save_settings(plan, cache.fingerprint)
    print(f"{'resuming' if plan.resume else 'starting'} search {plan.name!r}: space {plan.space.name}, "
          f"backbones {','.join(plan.backbones)}, "
          + (f"{plan.num_samples} trials" if plan.num_samples > 0 else "trials until the time budget runs out")
          + f" x <= {plan.max_epochs} epochs, "
          f"{plan.max_concurrent} at once ({plan.cpus_per_trial:g} CPU, {plan.gpus_per_trial:g} GPU each), "
          f"data {cache.source.get('kind')} {cache.fingerprint[:12]}"
          + (f", {len(holdout_rows):,} patches held out" if len(holdout_rows) else ""), flush=True)

    parent_run_id, _ = tracking.open_parent_run(plan.tracking_uri, plan.name, plan.experiment_path, params,
                                                tags={"validation": validation})
    tuner = build_tuner(plan, make_trainable(plan, str(cache.path), holdout_rows), parent_run_id)
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
    if not interrupted:  # the state Ray saved at the end names only kept checkpoints of unfinished trials
        prune_checkpoints(grid, {s.checkpoint_path for s in summaries if s.checkpoint_path}, unfinished)
    for s in summaries:  # Ray names checkpoints inside its filesystem: keep the storage URI for later readers
        s.checkpoint_path = uri_for(s.checkpoint_path, plan.storage_path)
    plan.interrupted, plan.unfinished = interrupted, len(unfinished)
    return finish(plan, summaries, cache, data_dir, parent_run_id, out_dir, holdout_rows)


def finish(plan: Plan, summaries, cache, data_dir, parent_run_id, out_dir: Path, holdout_rows=()) -> dict:
    from datasets.splits import validation_kind

    error_bars.attach_val_se(summaries, cache, holdout_rows)
    if len(holdout_rows) and not plan.interrupted:  # estimates the top trials; the ranking stays the search's
        for trial_id, est in holdout.score_top(summaries, cache, holdout_rows, plan.args.holdout_top).items():
            next(s for s in summaries if s.trial_id == trial_id).extra["holdout"] = est
    board = report.leaderboard(summaries)
    board_path = out_dir / "leaderboard.csv"
    with atomic_path(board_path) as tmp:
        board.to_csv(tmp, index=False)
    interrupted = plan.interrupted
    resume_hint = f"continue it with: python -m search.run --name {plan.name} --resume"
    print("\n" + report.format_leaderboard(board, plan.args.leaderboard_rows))
    best = report.winner(summaries)  # the leaderboard's first row (search.outcome.rank_key)
    if best is None:
        tracking.finish_parent(plan.tracking_uri, parent_run_id, metrics={"n_trials": len(summaries)},
                               tags={"outcome": "no trial reported"}, artifacts=[board_path],
                               status="KILLED" if interrupted else "FAILED")
        if interrupted:
            print(f"search interrupted before any epoch finished; {resume_hint}")
            return {}
        first = next((s.status for s in summaries if s.error), "no trial reported a result")
        advice = what_to_change([s.outcome for s in summaries])
        raise UserError(f"no trial of {plan.name} finished an epoch ({first}); see {board_path}"
                        + (f". {advice}" if advice else ""))
    child = _child_run_id(plan, parent_run_id, best.trial_id)
    record = report.best_config_record(
        best, name=plan.name, space=plan.space.name, experiment_path=plan.experiment_path, data_dir=data_dir,
        slide_map=str(Path(plan.args.slide_map).resolve()) if plan.args.slide_map else None,
        validation=validation_kind(cache),
        cache_path=str(cache.path), data_fingerprint=cache.fingerprint, tracking_uri=plan.tracking_uri,
        parent_run_id=parent_run_id, child_run_id=child,
        holdout=holdout.record(plan.args.holdout, holdout_rows, cache, best.extra.get("holdout")))
    best_path = out_dir / "best_config.json"
    report.write_json(best_path, record)
    explained = insight.explain_search(plan.study_storage, plan.name, out_dir,  # Optuna's plots, importances
                                       n_startup=searcher.startup_trials(plan.expected_trials))
    pictures = [report.plot_roc(best, out_dir / "roc_best.png"),
                report.plot_learning_curves(summaries, out_dir / "learning_curves.png"), *explained.pictures]
    kinds = [s.outcome.kind for s in summaries]
    counts = {"n_trials": len(summaries), "n_completed": kinds.count("completed"),
              "n_stopped_by_asha": kinds.count("stopped"), "n_cut_by_budget": kinds.count("budget"),
              "n_diverged": kinds.count("diverged"), "n_errored": kinds.count("errored"),
              "n_out_of_gpu_memory": kinds.count("gpu_memory")}
    tracking.finish_parent(
        plan.tracking_uri, parent_run_id,
        metrics={"best_val_auc": best.best_val_auc, "best_epoch": best.best_epoch, **counts,
                 "best_val_auc_se": best.extra.get("val_auc_se", math.nan),
                 **(best.extra["holdout"].metrics("holdout_auc") if "holdout" in best.extra else {}),
                 **{f"importance_{k}": v for k, v in explained.importances.items()}},
        tags={"best_trial_id": best.trial_id, "best_child_run_id": child or "",
              "best_backbone": best.config.get("backbone")},
        artifacts=[board_path, best_path, *space_copy(out_dir), *pictures],
        status="KILLED" if interrupted else "FINISHED",
        tables={"leaderboard.json": board})
    print(f"\nbest: trial {best.trial_id} val_auc {best.best_val_auc:.4f} (SE {best.extra.get('val_auc_se', math.nan):.4f}) "
          f"at epoch {best.best_epoch} ({best.status})"
          + (f"\nholdout AUC {best.extra['holdout'].text()}: {len(holdout_rows):,} patches no trial saw, an estimate "
             f"the choice never touched" if "holdout" in best.extra else "")
          + f"\nleaderboard: {board_path}\nbest config: {best_path}\n{explained.summary()}")
    close = error_bars.close_call(summaries, plan.name)
    if close:
        print(close)
    advice = what_to_change([s.outcome for s in summaries])
    if advice:
        print(advice)
    if interrupted:
        print(f"search interrupted with {plan.unfinished} trial(s) unfinished; {resume_hint}")
    elif plan.unfinished:  # Ray counts the budget across resumes: a spent budget is the end of this search
        print(f"time budget reached: {plan.unfinished} trial(s) cut short")
    views = tracking.link_search_views(plan.tracking_uri, plan.name, parent_run_id)
    print(f"compare the trials in MLflow (experiment {plan.name!r}):\n  {tracking.ui_command(plan.tracking_uri)}\n"
          f"  then open {views['runs']}\n  (the parent run's description links the trials' learning curves side by side)")
    return record


def space_copy(out_dir: Path) -> list[Path]:
    """The search's space file as it started (search.settings), logged with the parent run."""
    copy = out_dir / SPACE_COPY
    return [copy] if copy.is_file() else []


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
