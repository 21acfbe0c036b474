"""`make demo` (= `python -m search.demo`): the main job on the embedded synthetic data, minutes on a CPU.

A real, small search (the `demo` space: baseline_bn, lr / weight decay / augmentation, TPE proposing, ASHA
stopping the weak trials) -> the winner refit on every labelled patch -> the submission; then the three
things a user wants: the best config, the test AUC (the synthetic test split has labels), and where the
submission and the MLflow UI are. Running it again with the same --name resumes the finished search (at once)
and refits again.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from datasets.errors import UserError, run_cli

SHOWN_KEYS = ("backbone", "lr", "weight_decay", "aug_strength", "dropout", "unfreeze_depth", "batch_size")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default="demo", help="search name (default demo)")
    p.add_argument("--space", default="demo", help="search space (default demo; see python -m search.run "
                   "--list-spaces)")
    p.add_argument("--results-dir", help="results root (default $PCAM_TUNE_RESULTS, else ./results)")
    p.add_argument("--cache-dir", help="decode-once cache root (default $PCAM_TUNE_CACHE, else ~/.cache/pcam-tune)")
    return p


def _value(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def summary(results: Path, name: str) -> list[str]:
    """The closing lines, from the search's best_config.json and the refit's refit.json."""
    from search import tracking

    out = results / name
    best = json.loads((out / "best_config.json").read_text())
    refit = json.loads((out / "refit.json").read_text())
    config = ", ".join(f"{k} {_value(best['config'][k])}" for k in SHOWN_KEYS if best["config"].get(k) is not None)
    auc, ci = refit.get("test_auc"), refit.get("test_auc_ci")
    uri = best["tracking_uri"]
    return [
        f"best config (trial {best['trial_id']}, val AUC {best['best_val_auc']:.3f} at epoch {best['best_epoch']}): "
        f"{config}",
        (f"test AUC {auc:.3f}" + (f" (95 % CI {ci[0]:.3f}-{ci[1]:.3f})" if ci and None not in ci else "")
         if auc is not None else "test AUC: no test labels") +
        f" (the winner refit on {refit['n_train']:,} labelled patches for {refit['epochs']} epoch(s), "
        f"{'8-view TTA' if refit.get('tta') else 'no TTA'})",
        f"submission: {refit.get('submission') or out / 'submission.csv'}",
        f"MLflow UI: make ui (= {tracking.ui_command(uri)}), then open "
        f"{tracking.experiment_url(uri, best.get('mlflow_experiment') or name)}",
    ]


@run_cli
def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    from search.refit import best as refit_best
    from search import run as search_run

    started = time.monotonic()
    common = ["--name", args.name] + [v for opt in ("results_dir", "cache_dir") if getattr(args, opt)
                                      for v in ("--" + opt.replace("_", "-"), getattr(args, opt))]
    code = search_run.main(["--space", args.space, *common])
    if code:
        return code
    import ray

    ray.shutdown()  # the refit trains in this process: give it the whole machine
    code = refit_best.main(common)
    if code:
        return code
    try:
        lines = summary(search_run.results_root(args), args.name)
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"the demo ran but its results are incomplete ({e}); rerun `make demo`") from None
    minutes, seconds = divmod(int(time.monotonic() - started), 60)
    print(f"\n== demo {args.name!r} done in {minutes} min {seconds:02d} s ==", *lines, sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
