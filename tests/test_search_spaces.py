"""Search spaces, option checks and the pruned-aware TPE feedback (no Ray cluster needed)."""
from __future__ import annotations

import optuna
import pytest

from datasets.errors import UserError
from search import run as search_run
from search.searcher import PrunedAwareOptunaSearch, make_searcher, stopped_early
from search.spaces import SPACES, SpaceOptions, _num_stages as num_stages, define_by_run, get_space, list_spaces, \
    resolve_backbones
from trainables.models import MODELS, is_pretrainable

optuna.logging.set_verbosity(optuna.logging.WARNING)


def sample(space_name: str, opts: SpaceOptions, n: int = 30) -> list[dict]:
    space = get_space(space_name)
    fn = define_by_run(space, resolve_backbones(space, opts), opts)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=1))
    out = []
    for _ in range(n):
        trial = study.ask()
        constants = fn(trial)  # suggests first, so trial.params is filled after this
        out.append({**trial.params, **constants})
        study.tell(trial, 0.5)
    return out


def test_list_spaces_names_every_space_with_a_description():
    text = list_spaces()
    assert [line.split()[0] for line in text.splitlines()] == list(SPACES)
    assert all(len(line.split(None, 1)[1]) > 20 for line in text.splitlines())


def test_backbones_space_is_conditional_on_pretrained_backbones():
    configs = sample("backbones", SpaceOptions(max_epochs=3, seed=7), n=60)
    assert {c["backbone"] for c in configs} <= set(MODELS)
    assert len({c["backbone"] for c in configs}) > 3
    for c in configs:
        assert c["epochs"] == 3 and c["seed"] == 7 and c["pretrained"] is True
        assert 1e-4 <= c["lr"] <= 1e-2 and 0 <= c["aug_strength"] <= 1 and c["batch_size"] in (32, 64, 128)
        if is_pretrainable(c["backbone"]):
            assert 0 <= c["unfreeze_depth"] <= num_stages(c["backbone"])
        else:
            assert c["unfreeze_depth"] is None  # a baseline has nothing to unfreeze


def test_no_pretrained_and_backbones_restriction():
    configs = sample("backbones", SpaceOptions(backbones=("baseline_bn", "mobilenet_v2"), pretrained=False))
    assert {c["backbone"] for c in configs} == {"baseline_bn", "mobilenet_v2"}
    assert all(c["unfreeze_depth"] is None and c["pretrained"] is False for c in configs)


def test_baseline_finetune_and_smoke_spaces():
    base = sample("baseline", SpaceOptions())
    assert {c["backbone"] for c in base} == {n for n in MODELS if not is_pretrainable(n)}
    assert all(0 <= c["dropout"] <= 0.5 and not c["pretrained"] for c in base)
    fine = sample("finetune", SpaceOptions(backbone="mobilenet_v2"))
    assert {c["backbone"] for c in fine} == {"mobilenet_v2"}
    assert {c["unfreeze_depth"] for c in fine} <= set(range(num_stages("mobilenet_v2") + 1))
    smoke = sample("smoke", SpaceOptions(max_epochs=2), n=5)
    assert all(c["backbone"] == "baseline_bn" and c["max_train_samples"] <= 512 and c["epochs"] == 2 for c in smoke)


@pytest.mark.parametrize("space, opts, match", [
    ("backbones", SpaceOptions(backbones=("resnet18", "nope")), "unknown backbone 'nope' in --backbones"),
    ("baseline", SpaceOptions(backbones=("resnet18",)), "unknown backbone 'resnet18'"),
    ("finetune", SpaceOptions(), "--space finetune needs --backbone"),
    ("finetune", SpaceOptions(backbone="baseline_bn"), "unknown backbone 'baseline_bn' in --backbone"),
    ("finetune", SpaceOptions(backbone="resnet18", pretrained=False), "drop --no-pretrained"),
    ("backbones", SpaceOptions(backbone="resnet18"), "--backbone is for --space finetune"),
])
def test_bad_backbone_options(space, opts, match):
    with pytest.raises(UserError, match=match):
        resolve_backbones(get_space(space), opts)


def test_unknown_space():
    with pytest.raises(UserError, match="unknown --space 'big'.*backbones, baseline, finetune, smoke"):
        get_space("big")


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("30m", 1800), ("1h30m", 5400), ("1.5h", 5400),
                                           (None, None)])
def test_parse_duration(text, seconds):
    assert search_run.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["-5", "0", "soon", "5d"])
def test_parse_duration_rejects(text):
    with pytest.raises(UserError, match="--time-budget"):
        search_run.parse_duration(text)


def test_missing_weights_preflight_names_files_and_three_ways_out(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: nothing is available
    space, opts = get_space("backbones"), SpaceOptions(backbones=("baseline_bn", "resnet18", "mobilenet_v2"))
    with pytest.raises(UserError) as e:
        search_run.check_weights(space, resolve_backbones(space, opts), opts)
    msg = str(e.value)
    assert "\n" not in msg
    assert "resnet18: resnet18-" in msg and "mobilenet_v2: mobilenet_v2-" in msg and str(tmp_path) in msg
    assert "python -m trainables.weights import" in msg and "--backbones baseline_bn" in msg
    assert "--no-pretrained" in msg
    search_run.check_weights(space, resolve_backbones(space, opts), SpaceOptions(pretrained=False))  # no error


def _searcher(pruned_feedback: bool, max_t: int = 4):
    space = get_space("smoke")
    opts = SpaceOptions(max_epochs=max_t)
    s = make_searcher(define_by_run(space, ("baseline_bn",), opts), seed=0, num_samples=8, max_t=max_t,
                      pruned_feedback=pruned_feedback)
    return s


def _run_fake_trial(searcher, trial_id, aucs, status="running"):
    assert searcher.suggest(trial_id)["backbone"] == "baseline_bn"
    for epoch, auc in enumerate(aucs, 1):
        searcher.on_trial_result(trial_id, {"val_auc": auc, "training_iteration": epoch, "epoch": epoch,
                                            "trial_status": status})
    last = {"val_auc": aucs[-1], "training_iteration": len(aucs), "epoch": len(aucs), "trial_status": status}
    searcher.on_trial_complete(trial_id, last)


def test_asha_stopped_trials_are_told_to_optuna_as_pruned():
    s = _searcher(True)
    assert isinstance(s, PrunedAwareOptunaSearch)
    _run_fake_trial(s, "full", [0.6, 0.7, 0.8, 0.9], status="completed")
    _run_fake_trial(s, "asha", [0.95])  # high at rung 1, then stopped: not a final 0.95
    _run_fake_trial(s, "diverged", [0.5, 0.5], status="diverged")  # a real, final, bad result
    s.suggest("err")
    s.on_trial_complete("err", None, error=True)
    states = {t.number: t.state for t in s._ot_study.get_trials()}
    S = optuna.trial.TrialState
    assert states == {0: S.COMPLETE, 1: S.PRUNED, 2: S.COMPLETE, 3: S.FAIL}
    assert s._ot_study.best_value == 0.9  # the stopped trial's early 0.95 does not win
    pruned = s._ot_study.get_trials()[1]
    assert pruned.intermediate_values == {1: 0.95} and pruned.value == 0.95  # its history is kept for TPE


def test_stock_optuna_search_treats_asha_stops_as_final():
    s = _searcher(False)
    _run_fake_trial(s, "full", [0.6, 0.7, 0.8, 0.9], status="completed")
    _run_fake_trial(s, "asha", [0.95])
    assert s._ot_study.best_value == 0.95  # the defect the pruned-aware searcher fixes


def test_stopped_early():
    assert stopped_early({"training_iteration": 1, "trial_status": "running"}, 4)
    assert not stopped_early({"training_iteration": 4, "trial_status": "running"}, 4)
    assert not stopped_early({"training_iteration": 2, "trial_status": "diverged"}, 4)
    assert not stopped_early(None, 4)


def test_trial_status_wording():
    from search.report import trial_status

    done = {"epoch": 4, "training_iteration": 4, "trial_status": "completed"}
    early = {"epoch": 1, "training_iteration": 1, "trial_status": "running"}
    assert trial_status(done, 4) == "completed"
    assert trial_status(early, 4) == "stopped by ASHA at epoch 1"
    assert trial_status({**early, "trial_status": "diverged"}, 4) == "diverged at epoch 1"
    assert trial_status(early, 4, error="Traceback...\nValueError: boom\n") == "errored: ValueError: boom"
    assert trial_status(early, 4, finished=False, interrupted=True) == "interrupted at epoch 1"
    assert trial_status(early, 4, finished=False, budget_hit=True) == "stopped by time budget at epoch 1"
    assert trial_status(None, 4, finished=False, interrupted=True) == "pending"


def test_asha_rungs_tell_asha_stops_from_budget_cuts():
    from search.report import asha_rungs, trial_status

    assert asha_rungs(1, 2, 8) == {1, 2, 4} and asha_rungs(2, 3, 8) == {2, 6} and asha_rungs(1, 2, 1) == set()
    early = {"epoch": 1, "training_iteration": 1, "trial_status": "running"}
    assert trial_status(early, 8, rungs={2, 6}, budget_hit=True) == "stopped by time budget at epoch 1"
    assert trial_status({**early, "epoch": 2, "training_iteration": 2}, 8, rungs={2, 6}) == "stopped by ASHA at epoch 2"
