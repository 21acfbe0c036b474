"""Optuna TPE behind Ray Tune, told what really happened to every trial, in a study that persists.

What Ray 2.60 delivers (``TuneController._process_trial_result``): when the scheduler decides STOP for a result,
``search_alg.on_trial_result`` is *not* called for it; only ``on_trial_complete(trial_id, result)`` sees it. ASHA
decides STOP both at a rung where it cuts a trial and at max_t where the trial ends anyway. So Ray's stock
``OptunaSearch`` never records the value of the epoch at which a trial stopped (a trial stopped at the first
rung has no value at all), tells ASHA-stopped trials as COMPLETE with their low-rung AUC, and tells a diverged
trial as COMPLETE too. ``FeedbackOptunaSearch`` instead:
- reports the final result's value at its step before telling the trial, whatever the state;
- tells the state `search.outcome.decide` gives (with `SchedulerStopMarker` among the run's callbacks) (COMPLETE / PRUNED / FAIL), the same judgement the leaderboard
  and MLflow show; the state is the tier of `search.outcome.rank_key`, the one ranking rule, so Optuna (COMPLETE
  by value, then PRUNED by deepest step and value there) orders the trials as the leaderboard does;
- tags each Optuna trial with its Ray trial id and outcome (user attributes), so the driver can settle, after the
  search, the trials Ray never completed (cut by the time budget), and optuna-dashboard shows how each ended.

The study lives in an Optuna RDB storage (default ``sqlite:///<results>/optuna.db``, study name = search name):
``optuna-dashboard sqlite:///results/optuna.db`` shows it while the search runs, and a resumed search keeps
using the same study (Ray pickles the searcher with its study; RDBStorage reconnects on unpickling).

``OptunaSearch``'s private attributes (``_ot_trials``, ``_ot_study``, ``_completed_trials``) and Optuna's
``FrozenTrial._trial_id`` are reached through search.private_api, the one module that touches private parts.
"""
from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Callable

from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from search import private_api
from search.outcome import MODE, OBJECTIVE, STOP_MARK, Outcome, decide

logger = logging.getLogger(__name__)
RAY_TRIAL_ID = "ray_trial_id"  # Optuna user attribute: which Ray trial this is
OUTCOME_ATTR = "outcome"  # Optuna user attribute: Outcome.label
# Optuna user attribute: how the config was proposed: "start point" (the space's points_to_evaluate), "start-up"
# (the sampler's random start-up), "tpe" (the sampler's model), "warm start" (copied from an earlier search)
PROPOSED_BY = "proposed_by"
STARTUP_KINDS = ("start point", "start-up", "warm start")


def study_storage_url(results_dir: str | Path) -> str:
    return f"sqlite:///{Path(results_dir).resolve()}/optuna.db"


def open_storage(url: str):
    import optuna

    # A search's driver is the only writer; dashboards read alongside it. sqlite needs no server.
    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 30}}
                                      if url.startswith("sqlite") else None)


def load_study(storage_url: str, name: str):
    """The persisted study of search ``name`` (for plots, importances, tests)."""
    import optuna

    return optuna.load_study(study_name=name, storage=open_storage(storage_url))


def study_exists(storage_url: str, name: str) -> bool:
    import optuna

    if storage_url.startswith("sqlite:///") and not Path(storage_url[len("sqlite:///"):]).is_file():
        return False
    return any(s.study_name == name for s in optuna.get_all_study_summaries(open_storage(storage_url),
                                                                             include_best_trial=False))


class SchedulerStopMarker(Callback):
    """Marks the result at which the scheduler (ASHA) decided STOP, so the outcome can tell it from a time-budget
    cut. Ray sets ``done`` on that result before calling callbacks, lets callbacks modify it in place, and then
    keeps it as the trial's last result (TuneController._process_trial_result); a trainable's own results are
    never ``done`` there (its end arrives as a separate, duplicate result)."""

    def __init__(self, max_t: int):
        self.max_t = max_t

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("done") and int(result.get("training_iteration", 0)) < self.max_t \
                and result.get("trial_status") == "running":
            result[STOP_MARK] = True


class FeedbackOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch, told every trial's final value and its true outcome (see the module docstring)."""

    def __init__(self, *args, max_t: int, n_startup: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self._max_t = max_t
        self._n_startup = n_startup

    def suggest(self, trial_id: str):
        import optuna

        fresh = trial_id not in private_api.optuna_trials(self)
        if fresh:  # how the sampler will propose it (TPESampler's rule: start-up below n finished trials)
            study, states = private_api.optuna_study(self), optuna.trial.TrialState
            waiting = study.get_trials(deepcopy=False, states=(states.WAITING,))
            finished = study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED))
            # (getattr: a searcher pickled by an older version, restored by --resume, has no count)
            how = "start point" if waiting else "start-up" if len(finished) < getattr(self, "_n_startup", 0) else "tpe"
        config = super().suggest(trial_id)
        ot_trial = private_api.optuna_trials(self).get(trial_id)
        if ot_trial is not None and config is not None:
            ot_trial.set_user_attr(RAY_TRIAL_ID, trial_id)
            if fresh:
                ot_trial.set_user_attr(PROPOSED_BY, how)
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        asked, completed = private_api.optuna_trials(self), private_api.completed_trials(self)
        if trial_id not in asked:  # never suggested by this searcher: nothing to tell
            return None
        if trial_id in completed:
            return super().on_trial_complete(trial_id, result, error)  # Ray's warning for a repeat
        outcome = decide(result, self._max_t, error=error, finished=True)
        tell(private_api.optuna_study(self), asked[trial_id], outcome, result)
        completed.add(trial_id)


def _report_last(ot_trial, result: dict | None) -> None:
    """The value of the result Ray withheld from on_trial_result (the STOP decision's), at its step."""
    if not result:
        return
    value, step = result.get(OBJECTIVE), result.get("training_iteration")
    if value is None or step is None or not math.isfinite(float(value)):
        return
    with warnings.catch_warnings():  # a step already reported keeps its first value; no need to warn
        warnings.simplefilter("ignore")
        ot_trial.report(float(value), int(step))


def tell(study, ot_trial, outcome: Outcome, result: dict | None) -> None:
    """Record ``outcome`` of one Optuna trial: last value, user attributes, final state (if any)."""
    import optuna

    state = outcome.optuna_state
    try:
        if outcome.kind != "diverged":  # a diverged epoch's 0.5 is no measurement of the config
            _report_last(ot_trial, result)
        ot_trial.set_user_attr(OUTCOME_ATTR, outcome.label)
        if state is None:
            return
        value = result.get(OBJECTIVE) if result and state == "COMPLETE" else None
        if state == "COMPLETE" and (value is None or not math.isfinite(float(value))):
            state, value = "FAIL", None  # completed without a usable value: nothing TPE can learn from
        study.tell(ot_trial, None if value is None else float(value), state=optuna.trial.TrialState[state])
    except Exception as exc:  # e.g. already finished in the storage (a resume replayed it): keep searching
        logger.warning("could not tell trial %s to Optuna as %s: %s", ot_trial.number, state, exc)


LOST = "lost: the driver died before Ray saved this trial; the resumed search ran it again as another trial"


def settle_study(storage_url: str, name: str, outcomes: dict[str, tuple[Outcome, dict | None]],
                 search_over: bool = True) -> int:
    """After the search: tell the trials Ray never completed (cut by the time budget, never started) what
    happened; interrupted ones stay RUNNING for --resume. Once the search is over, a RUNNING trial Ray does not
    know (asked for just before a crash, after Ray's last save of its state) is told FAIL, so no config counts
    twice. Returns how many trials were settled."""
    import optuna

    study = load_study(storage_url, name)
    settled = 0
    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        trial = private_api.live_trial(study, frozen)
        ray_id = frozen.user_attrs.get(RAY_TRIAL_ID)
        if ray_id in outcomes:
            outcome, last = outcomes[ray_id]
            tell(study, trial, outcome, last)
            settled += outcome.optuna_state is not None
        elif search_over:
            trial.set_user_attr(OUTCOME_ATTR, LOST)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            settled += 1
    return settled


def startup_trials(num_samples: int) -> int:
    """TPE's random start-up trials: Optuna's default of 10 would leave a 16-trial search mostly random."""
    return max(2, min(10, num_samples // 4))


def make_sampler(seed: int, num_samples: int, *, n_startup: int | None = None, multivariate: bool = True,
                 constant_liar: bool = True, kind: str = "tpe"):
    """The search's sampler: seeded TPE (``kind="gp"``: Optuna's GP sampler, a search.bench candidate)."""
    import optuna

    # multivariate + group: TPE models parameters that occur together jointly, which is what a conditional
    # space (unfreeze_depth exists only for pretrained backbones) needs. Both are flagged experimental.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # Ray's table already shows every trial
    n_startup = startup_trials(num_samples) if n_startup is None else n_startup
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup)
    # constant_liar: trials still running count as bad guesses, so parallel trials do not all get the same config.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup, multivariate=multivariate,
                                      group=multivariate, constant_liar=constant_liar)


def make_searcher(define: Callable, *, seed: int, num_samples: int, max_t: int, metric: str = OBJECTIVE,
                  mode: str = MODE, feedback: bool = True, storage_url: str | None = None,
                  study_name: str | None = None, sampler=None, points_to_evaluate: list[dict] | None = None,
                  n_startup: int | None = None) -> OptunaSearch:
    """Seeded TPE over a define-by-run space; ``feedback=False`` gives Ray's stock behaviour (search.bench).
    ``storage_url``/``study_name``: persist the study (None: in memory); ``sampler``: another than make_sampler's;
    ``points_to_evaluate``: configs run first (the space's starting configurations); ``n_startup``: the sampler's
    start-up trials when ``sampler`` was made with another count (only to tag how each trial was proposed)."""
    sampler = sampler or make_sampler(seed, num_samples)
    persist = {"storage": open_storage(storage_url), "study_name": study_name} if storage_url else {}
    cls = FeedbackOptunaSearch if feedback else OptunaSearch
    kw = {"max_t": max_t, "n_startup": n_startup if n_startup is not None else startup_trials(num_samples)} \
        if feedback else {}
    alg = cls(space=define, metric=metric, mode=mode, sampler=sampler, points_to_evaluate=points_to_evaluate or None,
              **kw, **persist)
    name_objective(private_api.optuna_study(alg), metric)
    return alg


def warm_start(storage_url: str, name: str, source: str) -> int:
    """Create study ``name`` holding the finished trials of the earlier search ``source`` (same storage): params,
    distributions, states, values and intermediate values, so that TPE proposes from the new search's first trial.
    Returns how many trials were copied. Optuna's public API: create_trial + add_trials."""
    import optuna

    states = optuna.trial.TrialState
    old = load_study(storage_url, source)
    new = optuna.create_study(storage=open_storage(storage_url), study_name=name, direction="maximize")
    copies = [optuna.trial.create_trial(
        state=t.state, params=t.params, distributions=t.distributions,
        value=t.value if t.state == states.COMPLETE else None, intermediate_values=t.intermediate_values,
        user_attrs={**t.user_attrs, PROPOSED_BY: "warm start", "warm_start_from": f"{source} #{t.number}"})
        for t in old.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED, states.FAIL))]
    name_objective(new)
    new.add_trials(copies)
    return len(copies)


def name_objective(study, metric: str = OBJECTIVE) -> None:
    """Name the study's value (optuna-dashboard and Optuna's plots show it instead of "Objective 0")."""
    with warnings.catch_warnings():  # set_metric_names is flagged experimental
        warnings.simplefilter("ignore")
        if study.metric_names != [metric]:
            study.set_metric_names([metric])
