"""How a trial ended, decided in one place: the leaderboard, the MLflow child runs and the TPE feedback all
read the same `Outcome`, so a trial cannot be "stopped by ASHA" in one and "cut by the time budget" in another.

Why each kind exists, and what it means for each reader:

| kind        | when                                                          | TPE (Optuna) | MLflow   | ranked |
|-------------|---------------------------------------------------------------|--------------|----------|--------|
| completed   | trained to its max epochs                                     | COMPLETE     | FINISHED | yes    |
| stopped     | ASHA decided STOP at a rung (marked in its result, see below)  | PRUNED       | FINISHED | yes    |
| budget      | the search's time budget cut it while it ran                  | PRUNED       | KILLED   | yes    |
| cut         | ended early, not by ASHA, with no budget hit                  | PRUNED       | FINISHED | yes    |
| diverged    | its loss became NaN/inf                                       | FAIL         | FAILED   | no     |
| errored     | it raised                                                     | FAIL         | FAILED   | no     |
| gpu_memory  | CUDA ran out of memory (label names backbone, batch size)     | FAIL         | FAILED   | no     |
| silent      | ended without reporting an epoch                              | FAIL         | FAILED   | no     |
| interrupted | Ctrl-C / a crash left it mid-way: --resume continues it       | (running)    | KILLED   | yes    |
| unstarted   | the search ended before its first epoch                       | FAIL / (run) | KILLED   | no     |

How ASHA's stops are told from time-budget cuts: Ray marks a result ``done`` when the scheduler decides STOP for
it, before the callbacks see it; `search.searcher.SchedulerStopMarker` copies that into the result as
``stopped_by_scheduler``, which Ray then keeps as the trial's last result (and saves with the experiment). A
time-budget cut stops trials without any result (and, in the saved state, as TERMINATED like any other), so an
unmarked early end of a finished trial is the budget's (or, without a budget, something else's) doing.

PRUNED, not COMPLETE, for early stops: Optuna ranks every COMPLETE trial above every PRUNED one and orders
pruned trials by (deepest step reached, value there), which is what a partially trained trial is. FAIL for
diverged and errored trials: TPE ignores them, so a diverging learning rate never lands in its "good" group.
Out of GPU memory is its own kind because its cure is not in the config TPE searched but in the resources
(`--gpus-per-trial`) or the batch size: the summary says so (`what_to_change`).

The objective (one number everywhere: what TPE is told, what the leaderboard ranks, what refit_best reproduces)
is `best_val_auc`: the best validation AUC a trial reached up to that epoch, at `best_epoch`. Best, not last:
the checkpoint a trial keeps is its best epoch's, so that is the model the search actually found, and the
refit reproduces exactly that epoch (same schedule horizon, stopped at best_epoch). With the cosine schedule
the last epochs rarely differ much; where they do, the best epoch is the one worth having.

The ranking rule (`rank_key`, the only one: the leaderboard, best_config.json, refit_best, --top-k and
refit's cross-check sort by it, and the states TPE is told order trials the same way in Optuna): trials that
completed their schedule first, by objective; then trials that ended early, deepest epoch first, then by
objective; then those without a trustworthy objective. Why depth before value: a trial ASHA stopped at epoch 2 of
an 8-epoch cosine schedule was compared at that rung and lost to the trials that went on; its best AUC was
measured at a high learning rate, and refitting it means reproducing a model the schedule never finished. This
is also Optuna's own order (COMPLETE by value, then PRUNED by deepest step, then value there), so TPE's best
trial and the leaderboard's first row are the same trial (tests/test_ranking.py).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

OBJECTIVE, MODE = "best_val_auc", "max"
STOP_MARK = "stopped_by_scheduler"  # set in the result at which ASHA decided STOP (search.searcher)
# trainables.device.OutOfGPUMemory's message starts with this (and names backbone, batch size); torch's own
# error (raised outside fit) is torch.OutOfMemoryError / torch.cuda.OutOfMemoryError. Not a bare
# "OutOfMemoryError": Ray's ray.exceptions.OutOfMemoryError is its memory monitor killing a worker when the node
# runs low on host RAM, whose cure is not a larger --gpus-per-trial.
GPU_MEMORY = "out of GPU memory"
_GPU_MEMORY_ERROR = re.compile(r"out of GPU memory( \([^)]*\))?|torch\.(cuda\.)?OutOfMemoryError|CUDA out of memory")
_MLFLOW = {"completed": "FINISHED", "stopped": "FINISHED", "cut": "FINISHED", "budget": "KILLED",
           "interrupted": "KILLED", "unstarted": "KILLED"}


@dataclass(frozen=True)
class Outcome:
    kind: str
    epoch: int = 0  # last epoch reported
    error: str = ""
    search_over: bool = True  # False while a --resume can still continue the search (Ctrl-C)

    @property
    def label(self) -> str:
        e = self.epoch
        return {"completed": "completed", "stopped": f"stopped by ASHA at rung {e}",
                "budget": f"cut by time budget at epoch {e}", "cut": f"ended early at epoch {e}",
                "diverged": f"diverged at epoch {e}",
                "errored": f"errored: {self.error}" if self.error else "errored",
                "gpu_memory": _gpu_memory_label(self.error),
                "silent": "ended without reporting", "interrupted": f"interrupted at epoch {e}",
                "unstarted": "ended before its first epoch"}[self.kind]

    @property
    def rung(self) -> int | None:
        """The ASHA rung (epoch) at which the scheduler stopped the trial."""
        return self.epoch if self.kind == "stopped" else None

    @property
    def optuna_state(self) -> str | None:
        """Optuna TrialState name to tell, or None: leave the trial RUNNING (a resume continues it)."""
        if self.kind == "unstarted":
            return "FAIL" if self.search_over else None
        if self.kind == "interrupted":
            return None
        # The ranking rule's tier, so that Optuna orders the trials as the leaderboard does (module docstring).
        return ("COMPLETE", "PRUNED", "FAIL")[rank_key(self, 0.0)[0]]

    @property
    def mlflow_status(self) -> str:
        return _MLFLOW.get(self.kind, "FAILED")

    @property
    def ranked(self) -> bool:
        """Has a trustworthy objective: may lead the leaderboard and be refit."""
        return self.kind in ("completed", "stopped", "budget", "cut", "interrupted") and self.epoch > 0


def rank_key(outcome: Outcome, objective: float) -> tuple:
    """The one ranking rule (the module docstring says why): sort ascending, best first."""
    if not (outcome.ranked and math.isfinite(objective)):
        return (2, 0, -objective if math.isfinite(objective) else math.inf)
    return (0 if outcome.kind == "completed" else 1, -outcome.epoch, -objective)


def error_line(error) -> str:
    """The one informative line of a (Ray-wrapped) exception: its last non-empty line, e.g. 'ValueError: boom'."""
    if error is None:
        return ""
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(error).__name__)[:500]


def asha_rungs(grace_period: int, reduction_factor: float, max_epochs: int) -> set[int]:
    """The epochs at which ASHA can stop a trial (Ray's milestones: grace * rf^k below max_t)."""
    rungs, t = set(), float(grace_period)
    while t < max_epochs:
        rungs.add(int(t))
        t *= reduction_factor
    return rungs


def decide(last: dict | None, max_epochs: int, *, error=None, finished: bool = True, budget_hit: bool = False,
           interrupted: bool = False) -> Outcome:
    """The outcome of one trial from what Ray knows of it.

    ``last``: its last reported result; ``finished``: Ray ended it (not left RUNNING/PENDING in the saved
    experiment state for a resume: a Ctrl-C); ``budget_hit``/``interrupted``: how the search itself ended;
    ``error``: the exception or its text, or True when only the fact is known (Ray's searcher hooks)."""
    last = last or {}
    epoch = int(last.get("epoch") or last.get("training_iteration") or 0)
    if error is not None and error is not False:
        line = "" if error is True else error_line(error)
        return Outcome("gpu_memory" if _GPU_MEMORY_ERROR.search(line) else "errored", epoch, line)
    if last.get("trial_status") == "diverged":
        return Outcome("diverged", epoch)
    if last.get("trial_status") == "completed" or int(last.get("training_iteration") or 0) >= max_epochs:
        return Outcome("completed", epoch)
    if not epoch:  # nothing reported
        if not finished or budget_hit or interrupted:
            return Outcome("unstarted", 0, search_over=budget_hit and not interrupted)
        return Outcome("silent")
    if last.get(STOP_MARK):
        return Outcome("stopped", epoch)
    if not finished and (interrupted or not budget_hit):
        return Outcome("interrupted", epoch, search_over=False)
    return Outcome("budget" if budget_hit else "cut", epoch)


def _gpu_memory_label(error: str) -> str:
    """"out of GPU memory (backbone, batch size)" where the trainable named them (trainables.device)."""
    found = _GPU_MEMORY_ERROR.search(error or "")
    return found.group(0) if found and found.group(0).startswith(GPU_MEMORY) else GPU_MEMORY


def what_to_change(outcomes) -> str:
    """The summary's advice for trials that ran out of GPU memory ("" when none did)."""
    n = sum(o.kind == "gpu_memory" for o in outcomes)
    if not n:
        return ""
    return (f"{n} trial(s) ran out of GPU memory: give each trial more of a GPU (a larger --gpus-per-trial, e.g. 1, "
            f"runs fewer at once) or search smaller batch sizes (the status names each one's backbone and batch size)")
