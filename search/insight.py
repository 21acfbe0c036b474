"""A search explains itself: Optuna's own plots of the search's TPE study, and which parameters mattered.

Made from the persisted study (search.searcher.load_study) at the end of a search and of every resume,
written beside the leaderboard and logged to the MLflow parent run:

- ``optimization_history.png``: every completed trial's objective in the order TPE proposed it, and the
  best so far: did TPE improve on its random start-up trials?
- ``param_importances.png``: fANOVA importances (Optuna's default evaluator, seeded) over the completed
  trials; the same numbers as ``Insight.importances``;
- ``parallel_coordinate.png``: the completed trials' parameters against the objective;
- ``intermediate_values.png``: every trial's objective per epoch, stopped trials included: the ASHA rungs
  are where the short curves end.

Optuna computes importances from COMPLETE trials only (those ASHA stopped are PRUNED). With fewer than
``MIN_TRIALS_FOR_IMPORTANCE`` of them the numbers would be noise, so there are none, and the note says why.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from datasets.files import atomic_write

MIN_TRIALS_FOR_IMPORTANCE = 4
TOP_K = 3
PLOTS = ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values")


@dataclass
class Insight:
    pictures: list[Path] = field(default_factory=list)
    importances: dict[str, float] = field(default_factory=dict)  # all parameters, most important first
    n_completed: int = 0
    note: str | None = None  # why there are no importances (or no plots)
    tpe: str | None = None  # how TPE's trials compare with its random start-up trials

    def top(self, k: int = TOP_K) -> list[tuple[str, float]]:
        return list(self.importances.items())[:k]

    def summary(self) -> str:
        """The terminal summary: the top importances (or why none), and TPE against its start-up trials."""
        if not self.importances:
            line = f"parameter importances: {self.note}"
        else:
            top = ", ".join(f"{name} {value:.2f}" for name, value in self.top())
            line = f"what mattered most (fANOVA importance over {self.n_completed} completed trials): {top}"
        return line + (f"\n{self.tpe}" if self.tpe else "")


def _objective(trial) -> float | None:
    """What the leaderboard ranks by: a completed trial's value, a pruned one's value at the epoch it reached."""
    from optuna.trial import TrialState

    if trial.state == TrialState.COMPLETE:
        return trial.value
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        return trial.intermediate_values[max(trial.intermediate_values)]
    return None


def tpe_against_startup(study, n_startup: int) -> str | None:
    """'TPE: best of its 3 random start-up trials 0.812, best of the 9 trials it proposed 0.874 (better)' and a
    second line: how many of TPE's proposals beat the best start-up trial. The start-up trials are those the
    searcher tagged (search.searcher.PROPOSED_BY: start points, random start-up, warm start); untagged (Ray's stock
    OptunaSearch), the first ``n_startup`` trials, as TPESampler draws at random until that many finished."""
    from search.searcher import PROPOSED_BY, STARTUP_KINDS

    trials = [t for t in study.get_trials(deepcopy=False)]
    tagged = any(PROPOSED_BY in t.user_attrs for t in trials)
    kind = {t.number: t.user_attrs.get(PROPOSED_BY, "start-up" if t.number < n_startup else "tpe") if tagged else
            ("start-up" if t.number < n_startup else "tpe") for t in trials}
    scored = [(t.number, v) for t in trials if (v := _objective(t)) is not None]
    startup = [v for n, v in scored if kind[n] in STARTUP_KINDS]
    proposed = [v for n, v in scored if kind[n] == "tpe"]
    if not startup or not proposed:
        return None
    counts = {k: sum(kind[n] == k for n, _ in scored) for k in STARTUP_KINDS}
    what = "random start-up trials" if counts["start-up"] == len(startup) else "start-up trials (" + ", ".join(
        f"{c} {k.replace('start-up', 'random')}" for k, c in counts.items() if c) + ")"
    verdict = "better" if max(proposed) > max(startup) else "no better (yet)"
    beat = sum(v > max(startup) for v in proposed)
    return (f"TPE: best of its {len(startup)} {what} {max(startup):.3f}, best of the {len(proposed)} trials it "
            f"proposed {max(proposed):.3f} ({verdict})\n"
            f"TPE proposals that beat the best start-up trial: {beat} of {len(proposed)}")


def _evaluator():
    import optuna

    return optuna.importance.FanovaImportanceEvaluator(seed=0)  # seeded: the same study, the same numbers


def importances(study, n_completed: int) -> tuple[dict[str, float], str | None]:
    """(importances, None), or ({}, why not)."""
    import optuna

    if n_completed < MIN_TRIALS_FOR_IMPORTANCE:
        return {}, (f"need at least {MIN_TRIALS_FOR_IMPORTANCE} completed trials, this search has {n_completed} "
                    "(trials ASHA stopped early do not count)")
    try:
        values = optuna.importance.get_param_importances(study, evaluator=_evaluator())
    except (ValueError, RuntimeError) as e:  # e.g. no parameter common to all completed trials
        return {}, f"Optuna could not compute them ({str(e).splitlines()[0][:160]})"
    if not values:
        return {}, "no searched parameter is shared by all completed trials"
    return {name: float(v) for name, v in values.items()}, None


def _save(ax, path: Path) -> Path:
    from search.report import _pyplot

    plt = _pyplot()
    fig = ax.figure
    fig.set_size_inches(9, 5.5)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _intermediate_values(oplt, study):
    ax = oplt.plot_intermediate_values(study)
    ax.set_xlabel("epoch (a curve that ends early: stopped by ASHA at that rung)")
    ax.set_ylabel("best val AUC so far")
    return ax


def explain(study, out_dir: str | Path, n_startup: int | None = None) -> Insight:
    """Write the four plots that have something to show into ``out_dir`` and compute the importances;
    ``n_startup``: TPE's random start-up trials, to say how the trials TPE proposed compare."""
    import optuna
    from optuna.trial import TrialState

    from search.report import _pyplot

    _pyplot()  # the Agg backend before Optuna imports pyplot: the driver may have no display
    from optuna.visualization import matplotlib as oplt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    n_completed = sum(t.state == TrialState.COMPLETE for t in trials)
    values, note = importances(study, n_completed)
    insight = Insight(importances=values, n_completed=n_completed, note=note,
                      tpe=tpe_against_startup(study, n_startup) if n_startup else None)
    drawable = {"optimization_history": n_completed > 0, "param_importances": bool(values),
                "parallel_coordinate": n_completed > 0,
                "intermediate_values": any(t.intermediate_values for t in trials)}
    draw = {"optimization_history": lambda: oplt.plot_optimization_history(study, target_name="best val AUC"),
            "param_importances": lambda: oplt.plot_param_importances(study, evaluator=_evaluator()),
            "parallel_coordinate": lambda: oplt.plot_parallel_coordinate(study, target_name="best val AUC"),
            "intermediate_values": lambda: _intermediate_values(oplt, study)}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the matplotlib backend is flagged experimental
            for name in PLOTS:
                if drawable[name]:
                    insight.pictures.append(_save(draw[name](), out_dir / f"{name}.png"))
    finally:
        optuna.logging.set_verbosity(verbosity)
    if n_completed == 0 and insight.note is None:
        insight.note = "no completed trial yet"
    return insight


def explain_search(storage_url: str, name: str, out_dir: str | Path, n_startup: int | None = None) -> Insight:
    """``explain`` on the persisted study of search ``name``; a missing study is a note, not an error."""
    from search.searcher import load_study

    try:
        study = load_study(storage_url, name)
    except KeyError:
        return Insight(note=f"no Optuna study {name!r} in {storage_url}")
    return explain(study, out_dir, n_startup)
