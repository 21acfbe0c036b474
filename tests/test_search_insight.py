"""search.insight on real persisted Optuna studies: Optuna's four plots as PNGs and the top importances."""
from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from search import insight
from search.searcher import load_study, open_storage, study_storage_url

SPACE = {"lr": FloatDistribution(1e-4, 1e-1, log=True), "aug_strength": FloatDistribution(0.0, 1.0),
         "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
         "batch_size": CategoricalDistribution([32, 64, 128])}


def _auc(params: dict, epoch: int) -> float:
    """A search where lr decides (higher is better), augmentation a little, the rest nothing; better with epochs."""
    return 0.55 + 0.1 * (math.log10(params["lr"]) + 4) + 0.01 * params["aug_strength"] + 0.02 * epoch


def _search_like_study(tmp_path, n_complete: int, n_pruned: int, name: str = "s"):
    """Trials as the search tells them: per-epoch values, ASHA-stopped ones PRUNED at epoch 1, one FAIL."""
    storage = study_storage_url(tmp_path)
    study = optuna.create_study(study_name=name, storage=open_storage(storage), direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    rng = np.random.default_rng(0)
    for i in range(n_complete + n_pruned + 1):
        trial = study.ask(SPACE)
        epochs = 3 if i < n_complete else 1
        for epoch in range(1, epochs + 1):
            trial.report(_auc(trial.params, epoch) + rng.normal(0, 0.002), epoch)
        if i < n_complete:
            study.tell(trial, _auc(trial.params, epochs))
        elif i < n_complete + n_pruned:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, state=TrialState.FAIL)  # a diverged trial
    return storage, load_study(storage, name)


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_a_study_with_enough_trials_gets_four_plots_and_its_top_importances(tmp_path):
    _, study = _search_like_study(tmp_path, n_complete=20, n_pruned=6)
    result = insight.explain(study, tmp_path / "out")
    assert [p.name for p in result.pictures] == [f"{n}.png" for n in insight.PLOTS]
    assert all(_is_png(p) for p in result.pictures)
    assert result.n_completed == 20 and result.note is None
    assert set(result.importances) == set(SPACE)
    assert sum(result.importances.values()) == pytest.approx(1.0)
    top = result.top()
    assert len(top) == 3 and top[0][0] == "lr"  # the parameter the objective depends on
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    line = result.summary()
    assert line.startswith("what mattered most (fANOVA importance over 20 completed trials): lr ")
    assert insight.explain(study, tmp_path / "again").importances == result.importances  # seeded: repeatable


def test_too_few_completed_trials_say_so_instead_of_importances(tmp_path):
    _, study = _search_like_study(tmp_path, n_complete=2, n_pruned=7)
    result = insight.explain(study, tmp_path / "out")
    assert result.importances == {} and result.top() == []
    assert "need at least 4 completed trials, this search has 2" in result.summary()
    names = [p.name for p in result.pictures]
    assert names == ["optimization_history.png", "parallel_coordinate.png", "intermediate_values.png"]
    assert all(_is_png(p) for p in result.pictures)
    assert not (tmp_path / "out" / "param_importances.png").exists()


def test_an_empty_or_missing_study_is_a_note_not_a_crash(tmp_path):
    storage, study = _search_like_study(tmp_path, n_complete=0, n_pruned=0, name="only-failed")
    result = insight.explain(study, tmp_path / "out")  # one diverged trial: its epoch-1 value, nothing completed
    assert [p.name for p in result.pictures] == ["intermediate_values.png"] and result.n_completed == 0
    assert "this search has 0" in result.summary()
    missing = insight.explain_search(storage, "never-ran", tmp_path / "out2")
    assert missing.pictures == [] and "no Optuna study 'never-ran'" in missing.summary()
    assert insight.explain_search(storage, "only-failed", tmp_path / "out3").n_completed == 0


def test_tpe_is_compared_with_its_random_startup_trials(tmp_path):
    _, study = _search_like_study(tmp_path, n_complete=6, n_pruned=3)
    # What the leaderboard ranks by: completed trials' values, pruned ones' value at the epoch they reached.
    objective = {t.number: t.value if t.state == TrialState.COMPLETE else t.intermediate_values[1]
                 for t in study.trials if t.state != TrialState.FAIL}
    first, rest = max(objective[n] for n in range(3)), max(v for n, v in objective.items() if n >= 3)
    line = insight.tpe_against_startup(study, n_startup=3)
    beat = sum(v > first for n, v in objective.items() if n >= 3)
    assert line == (f"TPE: best of its 3 random start-up trials {first:.3f}, best of the {len(objective) - 3} "
                    f"trials it proposed {rest:.3f} ({'better' if rest > first else 'no better (yet)'})\n"
                    f"TPE proposals that beat the best start-up trial: {beat} of {len(objective) - 3}")
    assert insight.explain(study, tmp_path / "out", n_startup=3).summary().splitlines()[1:] == line.splitlines()
    assert insight.tpe_against_startup(study, n_startup=50) is None  # nothing proposed by TPE yet
    best = max(objective, key=objective.get)
    assert insight.tpe_against_startup(study, n_startup=best + 1).splitlines()[0].endswith("(no better (yet))")
