"""Refit, step 1: find the search to refit (its best_config.json, default the newest) and check it names a usable
trial; warn when the Ray experiment now ranks another trial first."""
from __future__ import annotations

import json
import math
from pathlib import Path

from datasets.errors import UserError


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
    """Warn when the Ray experiment now holds a better trial than best_config.json names, by the search's one
    ranking rule (search.outcome.rank_key).

    That happens when a search was resumed (or extended) after best_config.json was written and
    has not finished yet. Reads the experiment's files (ExperimentAnalysis); no Ray cluster starts.
    """
    exp = best.get("experiment_path")
    if not exp or ("://" not in str(exp) and not Path(exp).is_dir()):
        return
    from ray.tune import ExperimentAnalysis

    from search.outcome import OBJECTIVE, decide, rank_key

    try:
        trials = ExperimentAnalysis(exp).trials
    except Exception as e:  # a foreign/partial experiment folder must not block the refit
        print(f"note: could not read the Ray experiment {exp} to cross-check ({type(e).__name__}); using best_config.json")
        return
    max_epochs = int(best["config"].get("epochs") or 0)

    def key(t):
        last = t.last_result or {}
        value = float(last.get(OBJECTIVE, float("nan")))
        return rank_key(decide(last, max_epochs, error=t.status == "ERROR" or None), value), t.trial_id != best.get("trial_id")

    if not trials:
        return
    top = min(trials, key=key)
    if top.trial_id != best.get("trial_id"):
        top_auc = float((top.last_result or {}).get(OBJECTIVE, float("nan")))
        print(f"warning: the Ray experiment {exp} now ranks trial {top.trial_id} first ({OBJECTIVE} {top_auc:.4f}), "
              f"best_config.json names {best.get('trial_id')}: finish the search with "
              f"`python -m search.run --name {best['name']} --resume` to update it")


def _missing_search_message(results: Path, name: str) -> str:
    if (results / "ray" / name).is_dir():
        return (f"search {name!r} has no {results / name / 'best_config.json'} (it did not finish): "
                f"resume it with `python -m search.run --name {name} --resume`")
    known = sorted(p.parent.name for p in results.glob("*/best_config.json"))
    hint = f" (searches here: {', '.join(known)})" if known else ""
    return f"no search named {name!r} under {results}{hint}: run `python -m search.run --space smoke --name {name}`"
