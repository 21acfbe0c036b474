"""Search spaces, option checks and the pruned-aware TPE feedback (no Ray cluster needed)."""
from __future__ import annotations

import math

import optuna
import pytest

from datasets.errors import UserError
from search import plan as search_plan
from search.spaces import SPACES, SpaceOptions, define_by_run, drawn_keys, get_space, list_spaces, \
    resolve_backbones
from trainables.models import MODELS, is_pretrainable, num_stages

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


def test_baseline_finetune_demo_and_smoke_spaces():
    base = sample("baseline", SpaceOptions())
    assert {c["backbone"] for c in base} == {n for n in MODELS if not is_pretrainable(n)}
    assert all(0 <= c["dropout"] <= 0.5 and not c["pretrained"] for c in base)
    fine = sample("finetune", SpaceOptions(backbone="mobilenet_v2"))
    assert {c["backbone"] for c in fine} == {"mobilenet_v2"}
    assert {c["unfreeze_depth"] for c in fine} <= set(range(num_stages("mobilenet_v2") + 1))
    smoke = sample("smoke", SpaceOptions(max_epochs=2), n=5)
    assert all(c["backbone"] == "baseline_bn" and c["max_train_samples"] <= 512 and c["epochs"] == 2 for c in smoke)
    assert {c["precision"] for c in smoke} == {"auto"}
    assert {c["precision"] for c in sample("smoke", SpaceOptions(precision="fp32"), n=3)} == {"fp32"}  # --precision
    demo = sample("demo", SpaceOptions(max_epochs=3), n=20)
    assert all(c["backbone"] == "baseline_bn" and not c["pretrained"] and c["batch_size"] == 16 for c in demo)
    assert all(1e-4 <= c["lr"] <= 1e-2 and 0 <= c["aug_strength"] <= 1 for c in demo)
    with pytest.raises(UserError, match="--space demo always uses baseline_bn"):
        resolve_backbones(get_space("demo"), SpaceOptions(backbones=("resnet18",)))


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
    with pytest.raises(UserError, match="unknown --space 'big'.*backbones, baseline, finetune, probe, demo, smoke"):
        get_space("big")


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("30m", 1800), ("1h30m", 5400), ("1.5h", 5400),
                                           (None, None)])
def test_parse_duration(text, seconds):
    assert search_plan.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["-5", "0", "soon", "5d"])
def test_parse_duration_rejects(text):
    with pytest.raises(UserError, match="--time-budget"):
        search_plan.parse_duration(text)


def test_missing_weights_preflight_names_files_and_three_ways_out(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: nothing is available
    space, opts = get_space("backbones"), SpaceOptions(backbones=("baseline_bn", "resnet18", "mobilenet_v2"))
    with pytest.raises(UserError) as e:
        search_plan.check_weights(space, resolve_backbones(space, opts), opts)
    msg = str(e.value)
    assert "\n" not in msg
    assert "resnet18: resnet18-" in msg and "mobilenet_v2: mobilenet_v2-" in msg and str(tmp_path) in msg
    assert "python -m trainables.weights import" in msg and "--backbones baseline_bn" in msg
    assert "--no-pretrained" in msg
    search_plan.check_weights(space, resolve_backbones(space, opts), SpaceOptions(pretrained=False))  # no error


def test_outcome_of_every_ending():
    """One function decides how a trial ended; its wording, Optuna state and MLflow status (the real-Tuner
    checks of what Ray delivers are in test_search_feedback.py)."""
    from search.outcome import STOP_MARK, asha_rungs, decide

    done = {"epoch": 4, "training_iteration": 4, "trial_status": "completed"}
    early = {"epoch": 1, "training_iteration": 1, "trial_status": "running"}
    cases = [  # (outcome, label, optuna state, mlflow status, ranked)
        (decide(done, 4), "completed", "COMPLETE", "FINISHED", True),
        (decide({**early, STOP_MARK: True}, 4), "stopped by ASHA at rung 1", "PRUNED", "FINISHED", True),
        (decide(early, 4, budget_hit=True), "cut by time budget at epoch 1", "PRUNED", "KILLED", True),
        (decide(early, 4), "ended early at epoch 1", "PRUNED", "FINISHED", True),
        (decide({**early, "trial_status": "diverged"}, 4), "diverged at epoch 1", "FAIL", "FAILED", False),
        (decide(early, 4, error="Traceback...\nValueError: boom\n"), "errored: ValueError: boom", "FAIL", "FAILED",
         False),
        (decide(early, 4, finished=False, interrupted=True), "interrupted at epoch 1", None, "KILLED", True),
        (decide(None, 4, finished=False, interrupted=True), "ended before its first epoch", None, "KILLED", False),
        (decide(None, 4, budget_hit=True), "ended before its first epoch", "FAIL", "KILLED", False),
        (decide(None, 4), "ended without reporting", "FAIL", "FAILED", False),
    ]
    for o, label, state, mlflow_status, ranked in cases:
        assert (o.label, o.optuna_state, o.mlflow_status, o.ranked) == (label, state, mlflow_status, ranked), o
    assert decide({**early, STOP_MARK: True}, 4).rung == 1 and decide(early, 4, budget_hit=True).rung is None
    assert asha_rungs(1, 2, 8) == {1, 2, 4} and asha_rungs(2, 3, 8) == {2, 6} and asha_rungs(1, 2, 1) == set()


def test_objective_is_the_best_healthy_epoch():
    from trainables.train import best_of

    hist = [{"epoch": 1, "val_auc": 0.7}, {"epoch": 2, "val_auc": 0.8}, {"epoch": 3, "val_auc": 0.8},
            {"epoch": 4, "val_auc": 0.75}]
    assert best_of(hist) == (0.8, 2)  # ties keep the earlier epoch: the refit trains no longer than needed
    assert best_of(hist + [{"epoch": 5, "val_auc": 0.9, "trial_status": "diverged"}]) == (0.8, 2)
    auc, epoch = best_of([])
    assert math.isnan(auc) and epoch == 0


def sampled_keys(space_name: str, opts: SpaceOptions, n: int = 40) -> set[str]:
    space = get_space(space_name)
    fn = define_by_run(space, resolve_backbones(space, opts), opts)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=2))
    keys = set()
    for _ in range(n):
        trial = study.ask()
        fn(trial)
        keys |= set(trial.params)
    return keys


@pytest.mark.parametrize("space_name, opts", [
    ("backbones", SpaceOptions(backbones=("baseline_bn", "mobilenet_v2"))),
    ("backbones", SpaceOptions(backbones=("baseline_bn", "mobilenet_v2"), pretrained=False)),
    ("backbones", SpaceOptions(backbones=("baseline", "baseline_bn"))),
    ("baseline", SpaceOptions()),
    ("finetune", SpaceOptions(backbone="resnet18")),
    ("smoke", SpaceOptions()),
])
def test_every_space_declares_exactly_the_keys_it_draws(space_name, opts):
    """The live table's columns come from drawn_keys, so it must match what the define-by-run function draws."""
    space = get_space(space_name)
    declared = drawn_keys(space, resolve_backbones(space, opts), opts)
    assert set(declared) == sampled_keys(space_name, opts), f"space {space_name!r}"
    assert len(declared) == len(set(declared))


def test_every_space_is_covered_by_the_declared_keys_test():
    """A space added later (with its `searched` keys) gets sampled here too."""
    for name in SPACES:
        opts = SpaceOptions(backbone="resnet18") if name == "finetune" else SpaceOptions()
        space = get_space(name)
        assert set(drawn_keys(space, resolve_backbones(space, opts), opts)) == sampled_keys(name, opts), name
