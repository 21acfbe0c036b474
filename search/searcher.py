"""Optuna TPE behind Ray Tune, told the truth about trials that ASHA stopped early.

Ray's ``OptunaSearch.on_trial_complete`` tells Optuna every trial that ended without an error as COMPLETE,
with the metric of its *last* result. Under ASHA that last result is a low-rung AUC (epoch 1 or 2), so
TPE would rank a promising config stopped at epoch 1 against fully trained ones as if its epoch-1 AUC were
final, and learn that "good" configs are the ones that happen to look good early.

``PrunedAwareOptunaSearch`` tells Optuna such trials as PRUNED. Optuna keeps the per-epoch values that
``on_trial_result`` already reported (step = training iteration = epoch), and TPE ranks pruned trials
after the completed ones, deeper-reaching first, then by their value at that depth: the semantics the
sampler was designed for.
"""
from __future__ import annotations

import logging
import warnings
from typing import Callable

from ray.tune.search.optuna import OptunaSearch

logger = logging.getLogger(__name__)


def stopped_early(result: dict | None, max_t: int) -> bool:
    """A trial that stopped before max_t epochs while still healthy (ASHA or the time budget stopped it)."""
    if not result:
        return False
    return result.get("trial_status", "running") == "running" and result.get("training_iteration", 0) < max_t


class PrunedAwareOptunaSearch(OptunaSearch):
    def __init__(self, *args, max_t: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._max_t = max_t

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if error or trial_id in self._completed_trials or not stopped_early(result, self._max_t):
            # Finished (all epochs, or diverged: a real, bad, final value) or errored: Ray's handling is right.
            return super().on_trial_complete(trial_id, result, error)
        import optuna

        ot_trial = self._ot_trials[trial_id]
        # No value for a PRUNED trial: Optuna takes its last intermediate value, and TPE orders pruned
        # trials by (deepest step reached, value there) below every completed trial.
        try:
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
        except Exception as exc:  # e.g. no intermediate value at all: keep the search going
            logger.warning("could not tell trial %s to Optuna as pruned: %s", trial_id, exc)
        self._completed_trials.add(trial_id)


def make_sampler(seed: int, num_samples: int):
    import optuna

    # multivariate + group: TPE models parameters that occur together jointly, which is what a conditional
    # space (unfreeze_depth exists only for pretrained backbones) needs. Both are flagged experimental.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # Ray's table already shows every trial
    # Random start-up trials: Optuna's default of 10 would leave a 16-trial search mostly random.
    n_startup = max(2, min(10, num_samples // 4))
    # constant_liar: trials still running count as bad guesses, so parallel trials do not all get the same config.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup, multivariate=True, group=True,
                                      constant_liar=True)


def make_searcher(define: Callable, *, seed: int, num_samples: int, max_t: int, metric: str = "val_auc",
                  mode: str = "max", pruned_feedback: bool = True) -> OptunaSearch:
    """Seeded TPE over a define-by-run space; ``pruned_feedback=False`` gives Ray's stock behaviour (bench)."""
    sampler = make_sampler(seed, num_samples)
    if pruned_feedback:
        return PrunedAwareOptunaSearch(space=define, metric=metric, mode=mode, sampler=sampler, max_t=max_t)
    return OptunaSearch(space=define, metric=metric, mode=mode, sampler=sampler)
