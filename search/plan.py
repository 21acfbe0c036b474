"""What a search will do, decided and checked before Ray starts: the Plan.

Order, so that every mistake the user can fix costs seconds, not a Ray start: options -> space/backbones ->
pretrained weights (downloaded here, once) -> resources (search.resources) -> names and paths; a resumed search
takes its first run's settings (search.settings).
"""
from __future__ import annotations

import argparse
import math
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from datasets import defaults
from datasets.errors import UserError, check_writable
from search import cluster, holdout, resources, searcher, settings
from search.space_file import load_space
from search.spaces import SPACES, Space, SpaceOptions, get_space, pretrained_backbones_used, resolve_backbones
from search.storage import check_storage_path, join as join_storage

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def parse_duration(text: str | None) -> float | None:
    """'90' (seconds), and what pandas.Timedelta reads: '90s', '30m', '1.5h', '1h30m', '1 hour', '00:30:00', ...
    -> seconds; None/'' -> None (no budget). Forms pandas deprecates (such as '5d') are refused, not warned about."""
    if text in (None, ""):
        return None
    s = str(text).strip().lower()
    if s.startswith("-"):
        raise UserError(f"--time-budget {text!r} is negative; give a positive duration like 600, 30m or 2h")
    try:
        seconds = float(s)  # a plain number is seconds (pandas would read nanoseconds)
    except ValueError:
        import pandas as pd

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                seconds = pd.Timedelta(s).total_seconds()
        except (ValueError, TypeError, Warning):
            raise UserError(f"--time-budget {text!r} is not a duration; use seconds (600) or 30m, 2h, 1h30m, "
                            "'1 day'") from None
    if not seconds > 0 or not math.isfinite(seconds):
        raise UserError(f"--time-budget {text!r} must be more than zero")
    return seconds


@dataclass
class Plan:
    """Everything decided before Ray starts."""

    args: argparse.Namespace
    space: Space
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
    warm_start: dict | None = None  # --warm-start: the earlier search's saved settings (search.json) and name

    @property
    def expected_trials(self) -> int:
        """Trials the search plans for (TPE's start-up count): --num-samples, else the space's default, also when
        the time budget decides (num_samples = -1: Ray proposes trials until the budget runs out)."""
        return self.num_samples if self.num_samples > 0 else self.space.num_samples

    @property
    def trials_cap(self) -> int:
        """The most trials that can run at once because of the trial count (none with num_samples = -1)."""
        return self.num_samples if self.num_samples > 0 else 1 << 30


def _positive(value, option: str, allow_zero: bool = False):
    if value is not None and (value < 0 or (value == 0 and not allow_zero) or
                              (isinstance(value, float) and not math.isfinite(value))):
        raise UserError(f"{option} {value} must be {'zero or more' if allow_zero else 'more than zero'}")
    return value


def _is_uri(path: str) -> bool:
    return "://" in path


def _newest_experiment(storage_path: str, space: str | None) -> str | None:
    if _is_uri(storage_path) or not Path(storage_path).is_dir():
        return None
    runs = [p for p in Path(storage_path).iterdir()
            if (p / "tuner.pkl").is_file() and (space is None or p.name.startswith(f"{space}-"))]
    return max(runs, key=lambda p: p.stat().st_mtime).name if runs else None


def plan_search(args, argv) -> Plan:
    """Check every option and decide the search (``argv``: the command line, for cluster address checks)."""
    args.address = cluster.cluster_address(args.address, sys.argv[1:] if argv is None else argv)
    results = defaults.results_root(args.results_dir)
    storage = args.storage_path or str(results / "ray")
    if not _is_uri(storage):
        storage = str(Path(storage).resolve())
    check_storage_path(storage)
    cluster.check_job_paths(results_dir=results, storage_path=storage)
    given = chosen_space(args)  # an unknown space or a wrong space file fails first, whatever else is wrong
    if args.resume and not args.name:
        args.name = _newest_experiment(storage, given.name if given else None)
        if not args.name:
            raise UserError(f"--resume: no {given.name if given else ''} experiment found under {storage}; "
                            "pass --name NAME")
    if args.name and not NAME_RE.match(args.name):
        raise UserError(f"--name {args.name!r}: use letters, digits, '.', '_' or '-' (up to 100 characters)")
    from ray import tune

    resume = bool(args.name) and tune.Tuner.can_restore(join_storage(storage, args.name))
    if args.resume and not resume:
        raise UserError(f"--resume: nothing to resume at {join_storage(storage, args.name)}; "
                        "drop --resume to start a new search")
    saved = settings.load_settings(results, args.name) if resume else None
    space = given
    if saved:  # the space the search started with (its stored copy); a space file changed since is refused
        space = settings.resumed_space(args, saved, given, results)
        settings.apply_saved_settings(args, saved)
        if args.num_samples == -1:  # the time budget decided; it is restored with the other settings
            args.num_samples = None
    args.seed = 0 if args.seed is None else args.seed
    if space is None:
        raise UserError("--space is required; one of: " + ", ".join(SPACES) + " (see --list-spaces), "
                        "or --space-file FILE.yaml")
    for opt in ("num_samples", "max_epochs", "grace_period", "max_concurrent"):
        _positive(getattr(args, opt), "--" + opt.replace("_", "-"))
    _positive(args.cpus_per_trial, "--cpus-per-trial")
    _positive(args.gpus_per_trial, "--gpus-per-trial", allow_zero=True)
    if args.reduction_factor is not None and args.reduction_factor <= 1:
        raise UserError(f"--reduction-factor {args.reduction_factor} must be more than 1 (e.g. 2 or 3)")
    time_budget_s = parse_duration(args.time_budget)
    holdout.check_options(args.holdout, getattr(args, "holdout_top", holdout.DEFAULT_TOP))
    max_epochs = args.max_epochs or space.max_epochs
    grace = args.grace_period or min(space.grace_period, max_epochs)
    if grace > max_epochs:
        raise UserError(f"--grace-period {grace} is more than --max-epochs {max_epochs}")
    # A time budget without --num-samples: keep proposing trials until the budget runs out (Ray's num_samples=-1).
    num_samples = args.num_samples or (-1 if time_budget_s else space.num_samples)
    if isinstance(args.backbones, str):
        args.backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    args.pretrained = not args.no_pretrained if args.pretrained is None else args.pretrained
    opts = SpaceOptions(backbones=tuple(args.backbones) if args.backbones else None, pretrained=args.pretrained,
                        backbone=args.backbone, max_epochs=max_epochs, seed=args.seed,
                        precision=args.precision or "auto")
    backbones = resolve_backbones(space, opts)
    check_weights(space, backbones, opts)

    # On a cluster the resources are only known once connected (start_ray); locally check them now.
    cpt, gpt, conc = (0.0, 0.0, 0) if args.address else resources.resource_defaults(
        args, *resources.local_hardware(), num_samples if num_samples > 0 else 1 << 30)
    check_writable(results, "--results-dir", directory=True)  # the last check: before any work, not after it
    name = args.name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    warm = None if resume else check_warm_start(args, results, space, backbones, opts,
                                               args.study_storage or searcher.study_storage_url(results))
    return Plan(args=args, space=space, opts=opts, backbones=backbones, num_samples=num_samples,
                max_epochs=max_epochs, grace_period=grace,
                reduction_factor=args.reduction_factor or space.reduction_factor, time_budget_s=time_budget_s,
                cpus_per_trial=cpt, gpus_per_trial=gpt, max_concurrent=conc, name=name, results_dir=results,
                storage_path=storage, experiment_path=join_storage(storage, name), resume=resume,
                tracking_uri=defaults.default_tracking_uri(results, args.tracking_uri),
                study_storage=args.study_storage or searcher.study_storage_url(results), warm_start=warm)


def check_warm_start(args, results: Path, space, backbones, opts, study_storage: str) -> dict | None:
    """--warm-start NAME: a finished search of the same space (and backbones) whose study is in this storage."""
    source = getattr(args, "warm_start", None)
    if not source:
        return None
    saved = settings.load_settings(results, source) if NAME_RE.match(source) else None
    if saved is None or not searcher.study_exists(study_storage, source):
        where = results / source / settings.SETTINGS_FILE
        raise UserError(f"--warm-start {source!r}: no finished search of that name (neither {where} nor its study in "
                        f"{study_storage}); pass the --name of an earlier search")
    # The same space is the same file (its sha256; a search saved before space files had only its name).
    theirs = (saved.get("space"), saved.get("space_sha256", space.sha256), tuple(saved.get("backbones") or ()) or None,
              saved.get("pretrained"))
    ours = (space.name, space.sha256, tuple(args.backbones) if args.backbones else None, opts.pretrained)
    if theirs != ours:
        def text(s):
            return f"space {s[0]}" + (f" sha256 {s[1][:12]}" if theirs[1] != ours[1] else "") + \
                f", backbones {','.join(s[2] or ('default',))}, pretrained {s[3]}"

        raise UserError(f"--warm-start {source!r} searched another space ({text(theirs)}) than this search "
                        f"({text(ours)}); TPE can only start from trials of the same space (the same space file)")
    return {"name": source, **saved}


def chosen_space(args) -> Space | None:
    """The space of --space NAME (a built-in) or --space-file FILE (checked by the same loader), or None."""
    space_file = getattr(args, "space_file", None)
    if args.space and space_file:
        raise UserError(f"give --space {args.space} or --space-file {space_file}, not both")
    if space_file:
        return load_space(space_file)
    return get_space(args.space) if args.space else None


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
    from trainables.hub import is_hub_name

    # Every backbone that failed, each with its own reason (a hub line already names its repository and way out:
    # HF_TOKEN, or importing a file), so one run shows all there is to fix.
    failed = " | ".join(f"{b}: {e}" if is_hub_name(b) else f"{b}: {f} (expected at {p}; {download_error(e)})"
                        for b, f, p, e in missing)
    torchvision = any(not is_hub_name(m[0]) for m in missing)
    have = [b for b in backbones if b not in {m[0] for m in missing}]
    raise UserError(
        f"pretrained weights missing for {len(missing)} backbone(s) and the download failed: {failed}. Ways out: "
        + (f"(1) import a downloaded file: python -m trainables.weights import FILE --backbone NAME "
           f"(or set ${MIRROR_ENV} to a mirror of torchvision's weight files); " if torchvision else
           "(1) as each one says; ")
        + f"(2) restrict the search: --backbones {','.join(have) or 'baseline_bn'}; "
        f"(3) train from scratch: --no-pretrained")
