"""The leaderboard's error bars: each trial's val AUC standard error, and the one line that says when the top
trials are a tie as far as the validation patches can tell (search.auc_stats has the formulas)."""
from __future__ import annotations

from search.report import TrialSummary, rank_key, winner


def attach_val_se(summaries: list[TrialSummary], cache, holdout_rows=()) -> None:
    """Each trial's val AUC standard error (search.auc_stats.hanley_mcneil_se: the AUC and the class counts of
    the validation split the trial used) into ``extra["val_auc_se"]``."""
    from datasets.splits import train_val_split
    from search.auc_stats import hanley_mcneil_se
    from trainables.train import DEFAULTS

    counts: dict[tuple, tuple[int, int]] = {}
    for s in summaries:
        key = (float(s.config.get("val_fraction", DEFAULTS["val_fraction"])), int(s.config.get("seed", DEFAULTS["seed"])))
        if key not in counts:
            _, val = train_val_split(cache, key[0], key[1], exclude=holdout_rows)
            n_pos = int((cache.labels[val] == 1).sum())
            counts[key] = (n_pos, len(val) - n_pos)
        s.extra["val_auc_se"] = hanley_mcneil_se(s.best_val_auc, *counts[key])


def close_call(summaries: list[TrialSummary], name: str) -> str | None:
    """One line when other ranked trials lie within one standard error of the winner's val AUC: their order is
    partly a draw of the validation patches, so an ensemble of them is the safer pick."""
    from search.auc_stats import within_one_se

    best = winner(summaries)
    if best is None:
        return None
    ranked = [s.best_val_auc for s in summaries if rank_key(s)[0] < 2]
    se = best.extra.get("val_auc_se", float("nan"))
    n = within_one_se(ranked, se)
    if n < 2:
        return None
    return (f"{n} trials lie within one standard error ({se:.4f}) of the winner's val AUC {best.best_val_auc:.4f}: "
            f"their order is partly chance; an ensemble of them: python -m search.refit_best --name {name} --top-k {n}")
