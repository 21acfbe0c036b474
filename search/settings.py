"""The settings a search keeps for --resume (<results>/<name>/search.json): a resumed search runs with the
settings it started with, since the Ray state already holds the searcher, scheduler and trial configs built
from them."""
from __future__ import annotations

import json
from pathlib import Path

from datasets.errors import UserError
from search.report import write_json

SETTINGS_FILE = "search.json"
# Settings a resumed search takes from its first run (the Ray state already holds the searcher, scheduler and
# trial configs built from them); CLI values for these are ignored on resume.
RESUMED_SETTINGS = ("space", "backbones", "pretrained", "backbone", "num_samples", "max_epochs", "grace_period",
                    "reduction_factor", "time_budget", "seed", "data_dir", "slide_map", "tracking_uri", "max_concurrent",
                    "study_storage", "precision", "holdout")


def load_settings(results: Path, name: str) -> dict | None:
    path = results / name / SETTINGS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def apply_saved_settings(args, saved: dict) -> None:
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
        # A search saved before --holdout existed had none: its trials used every labelled patch.
        setattr(args, k, saved.get(k, 0.0 if k == "holdout" else None))


def save_settings(plan, data_fingerprint: str) -> None:
    """Write search.json for a new search (``plan``: its search.plan.Plan; search.plan reads this module)."""
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
                "precision": plan.opts.precision, "holdout": a.holdout,
                "warm_start": plan.warm_start["name"] if plan.warm_start else None,
                "experiment_path": plan.experiment_path}
    write_json(plan.results_dir / plan.name / SETTINGS_FILE, settings)
