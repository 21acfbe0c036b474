"""Refit, step 3: train. The members (the best trial, K folds of it, or the K best configs: search.refit.ensemble),
each along its trial's schedule to its best epoch, their test (and held-out) predictions; or, with
--from-checkpoint, the best trial's own weights."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datasets.errors import UserError
from search.holdout import predict_cache_rows  # the search's scoring of cache rows, shared
from search.refit.ensemble import Ensemble, Member, average, fit_members, fold_members, member_config, out_of_fold, top_k_members
from search.refit.tracking import epoch_reporter, log_member_metrics, member_run


@dataclass
class Fitted:
    """What the training phase hands the output phase."""
    ensemble: Ensemble
    probs: np.ndarray | None  # test probabilities (None: no test split)
    info: dict  # epochs, seed, members: for refit.json
    oof: dict | None = None  # search.refit.ensemble.out_of_fold's result (--folds)


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
            return train(m, cache, run is not None, getattr(args, "device", "auto"))

    def predict_rows(net, m: Member, rows):
        return predict_cache_rows(net, cache, rows, m.config, not args.no_tta, args.batch_size)

    trained = fit_members(members, train_one, predict_rows, test_rows)
    oof = out_of_fold(trained, lambda rows: cache.labels[rows],
                      lambda rows: None if cache.groups is None else cache.groups[rows]) if args.folds else None
    info = {"epochs": members[0].stop_epoch, "schedule_epochs": members[0].config["epochs"],
            "seed": members[0].config["seed"], "members": member_summaries(trained, test_labels, oof, member_runs)}
    if oof is not None:
        info.update(oof_auc=oof["oof_auc"], oof_auc_ci=[oof["oof_estimate"].lo, oof["oof_estimate"].hi],
                    fold_aucs=oof["fold_aucs"])
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


def train(m: Member, cache, log_to_mlflow: bool, device: str = "auto"):
    from trainables.train import fast_path, fit, pick_device

    dev = pick_device(device)
    path = fast_path(m.config, dev, training=True)
    print(f"training {m.config['backbone']} in {path.name} on {dev} ({path.reason})", flush=True)
    model, history = fit(m.config, cache, m.train_rows, val_idx=None, on_epoch=epoch_reporter(m.stop_epoch, log_to_mlflow),
                         progress=True, stop_epoch=m.stop_epoch, device=dev)
    if history and history[-1].get("trial_status") == "diverged":
        raise UserError(f"the refit ({m.name}) diverged at epoch {history[-1]['epoch']} (non-finite loss), nothing "
                        f"written: retry with another --seed, or rerun the search with a lower learning rate")
    return model


def checkpoint_model(best: dict, cache, test_rows, args) -> Fitted:
    """--from-checkpoint: the best trial's own weights (trained on the train split only), no refit."""
    from search.storage import local_checkpoint
    from trainables.train import CHECKPOINT_FILE, load_checkpoint_model, pick_device

    folder = best.get("checkpoint_path")
    missing = UserError(f"the best trial's checkpoint {folder} is missing ({best['_path']}): "
                        f"refit without --from-checkpoint, or rerun `python -m search.run --name {best['name']}`")
    if not folder:
        raise missing
    with local_checkpoint(folder) as local:  # a folder, or a download of an object-store URI
        if not (local / CHECKPOINT_FILE).is_file():
            raise missing
        net, cfg, epoch = load_checkpoint_model(local)
    net = net.to(pick_device(getattr(args, "device", "auto")))
    print(f"using the best trial's checkpoint {folder} (epoch {epoch}), no refit")
    probs = None if test_rows is None else predict_cache_rows(net, cache, test_rows, cfg, not args.no_tta, args.batch_size)
    return Fitted(Ensemble([(net, cfg)], ["checkpoint"]), probs, {"epochs": epoch, "seed": cfg["seed"], "members": []})
