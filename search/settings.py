"""The settings a search keeps for --resume (<results>/<name>/search.json): a resumed search runs with the
settings it started with, since the Ray state already holds the searcher, scheduler and trial configs built
from them. Its space file is kept beside them (<results>/<name>/space.yaml, with its sha256 in search.json):
a resumed search reads that copy, and a --space-file that differs from it is refused."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from datasets.errors import UserError
from datasets.files import write_atomically
from search.report import write_json
from search.space_file import load_space
from search.space_format import Space

SETTINGS_FILE = "search.json"
SPACE_COPY = "space.yaml"  # the text of the search's space file, as it started
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
    for key, option in (("data_dir", "--data-dir"), ("slide_map", "--slide-map")):  # the space: resumed_space
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
                "experiment_path": plan.experiment_path,
                # A built-in space is kept as its text too: a later version's file may differ.
                "space_file": None if plan.space.built_in else str(Path(plan.space.source).resolve()),
                "space_sha256": plan.space.sha256}
    folder = plan.results_dir / plan.name
    copy = folder / SPACE_COPY
    write_atomically(copy, plan.space.text.encode("utf-8"))  # byte for byte: its sha256 is the file's
    write_json(folder / SETTINGS_FILE, settings)


def resumed_space(args, saved: dict, given: Space | None, results: Path) -> Space:
    """The space a resumed search started with: its stored copy, checked against search.json's sha256. A --space
    or --space-file other than the one it started with is refused (a changed file with both sha256s)."""
    name, folder = args.name, results / args.name
    started_with = f"--space-file {saved['space_file']}" if saved.get("space_file") else f"--space {saved.get('space')}"
    if "space_sha256" not in saved:
        raise UserError(f"search {name!r} was started by an earlier pcam-tune whose spaces were Python code "
                        f"({folder / SETTINGS_FILE} keeps no space file); resume it with that version, or start a "
                        "new search with another --name")
    copy = folder / SPACE_COPY
    space = load_space(copy, built_in=not saved.get("space_file"))
    if space.sha256 != saved["space_sha256"]:
        raise UserError(f"{copy} was changed since search {name!r} started (sha256 {space.sha256[:12]}, "
                        f"{SETTINGS_FILE} says {saved['space_sha256'][:12]}); put back the file it started with, or "
                        "start a new search with another --name")
    if given is not None and (given.built_in != space.built_in or given.name != space.name and given.built_in):
        raise UserError(f"search {name!r} was started with {started_with}; resume it with that (or drop "
                        f"{given.option.split()[0]}), or start a new search with another --name")
    if given is not None and not given.built_in and given.sha256 != space.sha256:
        raise UserError(f"--space-file {given.source} (sha256 {given.sha256[:12]}) differs from the space search "
                        f"{name!r} started with ({saved['space_file']}, sha256 {space.sha256[:12]}, kept as {copy}); "
                        "resume without --space-file to continue with that copy, or start a new search with another "
                        "--name to search the changed space")
    original = Path(saved["space_file"]) if saved.get("space_file") else None
    if given is None and original is not None and original.is_file() and \
            hashlib.sha256(original.read_bytes()).hexdigest() != space.sha256:
        print(f"note: {original} changed since search {name!r} started; resuming with its copy {copy}", flush=True)
    return space
