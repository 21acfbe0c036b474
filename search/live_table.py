"""The live table the driver prints while a search runs (Ray's CLIReporter): our metric columns and the space's
searched keys."""
from __future__ import annotations

from typing import TYPE_CHECKING

from search.outcome import OBJECTIVE
from search.spaces import drawn_keys

if TYPE_CHECKING:
    from search.plan import Plan


METRIC_COLUMNS = {"epoch": "epoch", "val_auc": "val_auc", OBJECTIVE: "best", "val_loss": "val_loss",
                  "train_loss": "train_loss"}


def make_reporter(plan: Plan):
    from ray import tune

    # No sort_by_metric: Ray sorts with None for trials cut before reporting and crashes.
    # No column of the trainable's own trial_status: it is what the last epoch said ("running" for a trial ASHA
    # then stopped), beside Ray's status column (TERMINATED); Ray's is the true one, the leaderboard says how.
    return tune.CLIReporter(
        metric_columns=METRIC_COLUMNS,
        parameter_columns=table_columns(plan), max_report_frequency=15)


def table_columns(plan: Plan) -> list[str]:
    """The keys this search draws, for the live table (CLIReporter fails on a key a config lacks,
    and conditional keys such as unfreeze_depth are always present, as None when not drawn)."""
    return drawn_keys(plan.space, plan.backbones, plan.opts)
