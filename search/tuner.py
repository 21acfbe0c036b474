"""The Ray side of a search: start (or join) Ray, check the cluster's nodes, wrap the trainable with its resources,
and build the Tuner, new (TPE + ASHA, MLflow callbacks, checkpoints) or restored for --resume."""
from __future__ import annotations

from typing import TYPE_CHECKING

from datasets.errors import UserError
from search import cluster, live_table, private_api, searcher, trial_runs
from search.outcome import MODE, OBJECTIVE
from search.spaces import define_by_run, pretrained_backbones_used, start_points

if TYPE_CHECKING:
    from search.plan import Plan


def start_ray(plan: Plan) -> None:
    import ray

    if not ray.is_initialized():
        kwargs = {"address": plan.args.address} if plan.args.address else {}
        # Trial stdout stays in the trial folders: the live table is the driver's output, and a trial's
        # error still reaches the table, the leaderboard and MLflow.
        ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False, **kwargs)
    if plan.args.address:  # only now can a cluster's resources be known and checked
        plan.cpus_per_trial, plan.gpus_per_trial, plan.max_concurrent = cluster.trial_resources(
            plan.args, cluster.alive_nodes(), plan.trials_cap, where=f"the Ray cluster at {plan.args.address}")


def check_nodes(plan: Plan, cache, data_dir: str | None) -> None:
    """On a cluster, every node that may get a trial must see the cache, the weights and the storage path."""
    if plan.args.address:
        hosts = cluster.trial_hosts(cluster.alive_nodes(), plan.cpus_per_trial, plan.gpus_per_trial)
        cluster.preflight(hosts, cluster.Needs(
            cache_path=str(cache.path), fingerprint=cache.fingerprint, storage_path=plan.storage_path,
            pretrained=tuple(pretrained_backbones_used(plan.space, plan.backbones, plan.opts)), data_dir=data_dir))


def make_trainable(plan: Plan, cache_path: str, holdout_rows=None):
    from ray import tune

    from trainables.train import train_pcam

    # The path (not the arrays) goes to the trials: each worker memory-maps the decode-once cache. The holdout's
    # row numbers go along (Ray's object store), so no trial trains or validates on them.
    return tune.with_resources(tune.with_parameters(train_pcam, cache_path=cache_path, holdout_rows=holdout_rows),
                               {"cpu": plan.cpus_per_trial, "gpu": plan.gpus_per_trial})


def make_scheduler(max_t: int, grace_period: int, reduction_factor: float, brackets: int = 1):
    """ASHA over epochs (training_iteration): every trial gets ``grace_period`` epochs, the top 1/rf go on."""
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=grace_period,
                         reduction_factor=reduction_factor, brackets=brackets)


def build_tuner(plan: Plan, trainable, parent_run_id: str):
    from ray import tune

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
            run_config.progress_reporter = live_table.make_reporter(plan)
        return tuner
    if searcher.study_exists(plan.study_storage, plan.name):
        raise UserError(f"an Optuna study named {plan.name!r} already exists in {plan.study_storage} but its Ray "
                        f"experiment {plan.experiment_path} is gone; start with another --name, or delete the study: "
                        f"optuna delete-study --storage {plan.study_storage} --study-name {plan.name}")
    if plan.warm_start:  # TPE starts from the earlier search's trials (its start points were run there)
        searcher.warm_start(plan.study_storage, plan.name, plan.warm_start["name"])
    search_alg = searcher.make_searcher(
        define_by_run(plan.space, plan.backbones, plan.opts), seed=plan.args.seed, num_samples=plan.expected_trials,
        max_t=plan.max_epochs, feedback=not plan.args.stock_feedback,
        storage_url=plan.study_storage, study_name=plan.name,
        points_to_evaluate=None if plan.warm_start else start_points(plan.space, plan.backbones, plan.opts))
    scheduler = make_scheduler(plan.max_epochs, plan.grace_period, plan.reduction_factor)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=OBJECTIVE, mode=MODE, search_alg=search_alg, scheduler=scheduler,
                                    num_samples=plan.num_samples, max_concurrent_trials=plan.max_concurrent,
                                    time_budget_s=plan.time_budget_s,
                                    # Probe trials last seconds: a fresh worker process (imports) would cost more.
                                    reuse_actors=plan.space.cached_features),
        run_config=tune.RunConfig(
            name=plan.name, storage_path=plan.storage_path, callbacks=callbacks,
            # The best epoch's checkpoint (the model the objective describes) and the latest; Ray deletes the others
            # only after the search (private_api.keeping_checkpoints, prune_checkpoints).
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_auc",
                                                    checkpoint_score_order=MODE),
            # Errors in a trial are recorded and the search goes on; on a cluster, retry a trial whose node
            # died (from its checkpoint) before calling it failed.
            failure_config=tune.FailureConfig(max_failures=2 if plan.args.address else 0, fail_fast=False),
            progress_reporter=live_table.make_reporter(plan),
            verbose=1),
    )


def prune_checkpoints(result_grid, keep: set[str], unfinished: set[str]) -> int:
    """After the search: every finished trial keeps its best epoch's checkpoint (``keep``: the leaderboard's paths,
    as Ray's filesystem names them) and its latest; its other checkpoint folders are deleted. Unfinished trials
    (``--resume`` continues them) keep all. Returns how many were deleted.

    During the search Ray deletes nothing (search.private_api.keeping_checkpoints says why), so a search holds
    every epoch's checkpoint of its trials until it ends."""
    import pyarrow.fs

    deleted = 0
    for result in result_grid:
        if (result.metrics or {}).get("trial_id") in unfinished or result.path is None:
            continue
        fs = result.filesystem
        latest = result.checkpoint.path if result.checkpoint else None
        for info in fs.get_file_info(pyarrow.fs.FileSelector(result.path)):
            name = info.path.rstrip("/").rsplit("/", 1)[-1]
            if info.type != pyarrow.fs.FileType.Directory or not name.startswith("checkpoint_"):
                continue
            if info.path in keep or info.path == latest:
                continue
            fs.delete_dir(info.path)
            deleted += 1
    return deleted
