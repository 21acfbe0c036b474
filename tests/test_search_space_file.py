"""Search spaces as YAML files (search.space_file): the loader, the built-in files, the documented example, and
every kind of mistake as one line naming the file, the key and what is allowed."""
from __future__ import annotations

import textwrap
from pathlib import Path

import optuna
import pytest

from datasets.errors import UserError
from search import plan as search_plan
from search import run as search_run
from search.space_file import load_space
from search.spaces import SPACE_FILES, SPACES, SpaceOptions, define_by_run, drawn_keys, get_space, \
    resolve_backbones, start_points
from trainables.models import num_stages

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "docs" / "examples" / "my_space.yaml"

optuna.logging.set_verbosity(optuna.logging.WARNING)

GOOD = """\
name: mine
description: a small space of my own
backbones: {choose: [baseline_bn, mobilenet_v2]}
scheduler: {num_samples: 7, max_epochs: 3}
parameters:
  lr: {distribution: log_uniform, low: 1e-4, high: 1e-2}
  head: {distribution: categorical, choices: [linear, mlp]}
  head_hidden: {distribution: int, low: 32, high: 256, step: 32, when: {head: mlp}}
  unfreeze_depth: {distribution: int, low: 0, high: stages, when: {backbone: pretrained}, otherwise: null}
constants: {batch_size: 32, max_train_samples: 100}
start:
  - {backbone: mobilenet_v2, lr: 1e-3, head: linear, unfreeze_depth: stages}
  - {backbone: baseline_bn, lr: 1e-3, unfreeze_depth: stages}
"""


def write(tmp_path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def draws(space, opts: SpaceOptions, n: int = 40) -> list[dict]:
    fn = define_by_run(space, resolve_backbones(space, opts), opts)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    out = []
    for _ in range(n):
        trial = study.ask()
        constants = fn(trial)  # suggests first: trial.params is filled after this
        out.append({**trial.params, **constants})
        study.tell(trial, 0.5)
    return out


def test_a_file_becomes_a_space_that_draws_what_it_says(tmp_path):
    space = load_space(write(tmp_path, GOOD))
    assert (space.name, space.num_samples, space.max_epochs, space.grace_period, space.reduction_factor) == \
        ("mine", 7, 3, 1, 2)  # unset scheduler keys keep their defaults
    assert not space.built_in and space.option == f"--space-file {tmp_path / 'space.yaml'}"
    opts = SpaceOptions(max_epochs=3, seed=4)
    configs = draws(space, opts)
    for c in configs:
        assert 1e-4 <= c["lr"] <= 1e-2 and c["batch_size"] == 32 and c["max_train_samples"] == 100
        assert (c["epochs"], c["seed"], c["pretrained"]) == (3, 4, True)
        assert c["head_hidden"] in range(32, 257, 32) if c["head"] == "mlp" else c["head_hidden"] == 256  # DEFAULTS
        if c["backbone"] == "mobilenet_v2":
            assert 0 <= c["unfreeze_depth"] <= num_stages("mobilenet_v2")
        else:
            assert c["unfreeze_depth"] is None
    assert {c["backbone"] for c in configs} == {"baseline_bn", "mobilenet_v2"}
    assert drawn_keys(space, ("baseline_bn", "mobilenet_v2"), opts) == \
        ["backbone", "lr", "head", "head_hidden", "unfreeze_depth"]
    assert drawn_keys(space, ("baseline_bn",), opts) == ["backbone", "lr", "head", "head_hidden"]
    assert start_points(space, ("baseline_bn", "mobilenet_v2"), opts) == [
        {"backbone": "mobilenet_v2", "lr": 1e-3, "head": "linear", "unfreeze_depth": num_stages("mobilenet_v2")},
        {"backbone": "baseline_bn", "lr": 1e-3}]  # no depth where the backbone cannot draw one
    no_weights = SpaceOptions(pretrained=False)
    assert all(c["unfreeze_depth"] is None and c["pretrained"] is False for c in draws(space, no_weights, 10))


def test_the_built_in_spaces_are_the_files_in_the_package():
    assert sorted(p.stem for p in SPACE_FILES.glob("*.yaml")) == sorted(SPACES)
    for name in SPACES:
        space = get_space(name)
        assert space.built_in and space.name == name and space.option == f"--space {name}"
        assert space.text == (SPACE_FILES / f"{name}.yaml").read_text()
    assert get_space("probe").cached_features and not get_space("backbones").cached_features


def test_the_documented_example_loads_and_draws(tmp_path):
    body = "".join(line for line in EXAMPLE.read_text().splitlines(True) if not line.startswith("#"))
    assert f"```yaml\n{body}```" in (REPO / "docs" / "search.md").read_text()  # the docs show the file as it is
    space = load_space(EXAMPLE)
    opts = SpaceOptions()
    backbones = resolve_backbones(space, opts)
    assert backbones == ("resnet18", "mobilenet_v2")
    assert drawn_keys(space, backbones, opts) == ["backbone", "lr", "weight_decay", "label_smoothing", "batch_size",
                                                  "unfreeze_depth", "dropout"]
    for c in draws(space, opts):
        assert c["dropout"] == 0.3 if c["backbone"] == "mobilenet_v2" else 0 <= c["dropout"] <= 0.5
        assert 1 <= c["unfreeze_depth"] <= num_stages(c["backbone"])
        assert round(c["label_smoothing"] / .05, 9) in range(5)
    with pytest.raises(UserError, match="unknown backbone 'baseline_bn' in --backbones for --space-file"):
        resolve_backbones(space, SpaceOptions(backbones=("baseline_bn",)))  # allowed: pretrainable


def test_a_search_of_a_file_plans_with_its_defaults(tmp_path):
    path = write(tmp_path, GOOD)
    plan = search_run.make_plan(["--space-file", str(path), "--results-dir", str(tmp_path / "r")])
    assert (plan.space.name, plan.num_samples, plan.max_epochs, plan.grace_period) == ("mine", 7, 3, 1)
    assert plan.name.startswith("mine-") and plan.backbones == ("baseline_bn", "mobilenet_v2")


def _bad(text):
    return textwrap.dedent(GOOD.split("parameters:")[0]) + textwrap.dedent(text)


@pytest.mark.parametrize("text, key, fragments", [
    # an unknown distribution
    (_bad("parameters:\n  lr: {distribution: loguniform, low: 1e-4, high: 1e-2}\n"), "parameters.lr.distribution",
     ["unknown distribution 'loguniform'", "allowed: log_uniform, uniform, int, categorical"]),
    # a low above its high, and a log scale from zero
    (_bad("parameters:\n  lr: {distribution: uniform, low: 0.1, high: 0.01}\n"), "parameters.lr",
     ["low 0.1 is above high 0.01", "low <= high"]),
    (_bad("parameters:\n  lr: {distribution: log_uniform, low: 0, high: 0.01}\n"), "parameters.lr.low",
     ["a log scale needs low > 0"]),
    # an unknown backbone, in the choice and in a condition
    ("backbones: {choose: [baseline_bn, resnet19]}\n", "backbones.choose", ["unknown backbone 'resnet19'", "resnet18"]),
    ("backbones: {choose: [resnet18, baseline_bn], allowed: pretrainable}\n", "backbones.choose",
     ["'baseline_bn' is outside allowed: pretrainable"]),
    (_bad("parameters:\n  lr: {distribution: uniform, low: 0, high: 1, when: {backbone: [vgg17]}}\n"),
     "parameters.lr.when.backbone", ["unknown backbone 'vgg17'"]),
    # an unknown config key (the trainable's keys), and one the search sets itself
    (_bad("parameters:\n  learning_rate: {distribution: uniform, low: 0, high: 1}\n"), "parameters.learning_rate",
     ["unknown config key 'learning_rate'", "lr, weight_decay"]),
    (_bad("constants: {epochs: 3}\n"), "constants.epochs", ["set by the search", "max_epochs"]),
    # a condition on a parameter that does not exist (or is no choice)
    (_bad("parameters:\n  dropout: {distribution: uniform, low: 0, high: 0.5, when: {head: mlp}}\n"),
     "parameters.dropout.when.head", ["no parameter 'head' is drawn before this one"]),
    (_bad("parameters:\n  head: {distribution: categorical, choices: [linear, mlp]}\n"
          "  dropout: {distribution: uniform, low: 0, high: 0.5, when: {head: conv}}\n"),
     "parameters.dropout.when.head", ["'conv' is not one of head's choices: linear, mlp"]),
    # a wrong type
    (_bad("parameters:\n  batch_size: {distribution: categorical, choices: 64}\n"), "parameters.batch_size.choices",
     ["give a non-empty list"]),
    (_bad("parameters:\n  batch_size: {distribution: int, low: 16, high: many}\n"), "parameters.batch_size.high",
     ["'many' is not a whole number"]),
    # a start configuration outside its parameter's range, or with a key the space does not draw
    (_bad("parameters:\n  lr: {distribution: log_uniform, low: 1e-4, high: 1e-2}\nstart:\n  - {lr: 0.5}\n"),
     "start[0].lr", ["0.5 is outside the parameter's range", "in [0.0001, 0.01]"]),
    (_bad("parameters:\n  lr: {distribution: log_uniform, low: 1e-4, high: 1e-2}\nstart:\n  - {dropout: 0.1}\n"),
     "start[0].dropout", ["not a drawn parameter", "allowed: backbone, lr"]),
    # a value the trainable itself refuses (trainables.config.resolve_config), found before any trial
    (_bad("constants: {aug_strength: 2}\n"), "constants.aug_strength",
     ["2: the trainable refuses it (aug_strength must be in [0, 1], got 2)"]),
    (_bad("parameters:\n  head: {distribution: categorical, choices: [linear, conv]}\n"), "parameters.head.choices",
     ["'conv': the trainable refuses it (head must be None, 'linear' or 'mlp'"]),
    # keys the format does not have
    ("backbones: {fixed: baseline_bn}\nscheduler: {max_epoch: 3}\n", "scheduler.max_epoch",
     ["unknown key", "max_epochs"]),
])
def test_each_mistake_is_one_line_naming_the_file_and_key(tmp_path, text, key, fragments):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_space(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: {key}: "), msg
    for f in fragments:
        assert f in msg, msg


def test_a_yaml_syntax_error_names_its_line(tmp_path):
    path = write(tmp_path, "name: x\nparameters:\n  lr: {distribution: uniform, low: 0, high: 1\nconstants: {}\n")
    with pytest.raises(UserError, match=rf"^{path}:4:\d+: not valid YAML \(expected ',' or '}}'"):
        load_space(path)
    path = write(tmp_path, "name: x\nname: y\n", "twice.yaml")
    with pytest.raises(UserError, match=rf"^{path}:2:1: not valid YAML \(key 'name' given twice\)"):
        load_space(path)


def test_a_missing_file_and_both_options(tmp_path):
    with pytest.raises(UserError, match=rf"^space file {tmp_path / 'nope.yaml'}: no such file"):
        search_run.make_plan(["--space-file", str(tmp_path / "nope.yaml"), "--results-dir", str(tmp_path)])
    with pytest.raises(UserError, match="give --space smoke or --space-file .*, not both"):
        search_run.make_plan(["--space", "smoke", "--space-file", str(write(tmp_path, GOOD)),
                              "--results-dir", str(tmp_path)])


def test_the_cli_prints_a_file_mistake_in_one_line_before_ray(tmp_path):
    import subprocess
    import sys

    path = write(tmp_path, _bad("parameters:\n  lr: {distribution: gaussian, low: 0, high: 1}\n"))
    proc = subprocess.run([sys.executable, "-m", "search.run", "--space-file", str(path),
                           "--results-dir", str(tmp_path / "r")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == \
        f"error: {path}: parameters.lr.distribution: unknown distribution 'gaussian'; allowed: log_uniform, " \
        "uniform, int, categorical", proc.stderr[-2000:]
    assert "starting search" not in proc.stdout


@pytest.mark.parametrize("text, seconds", [("1h30m", 5400), ("1 hour", 3600), ("90min", 5400), ("00:30:00", 1800),
                                           ("1h 30m", 5400), ("2 days", 172800), (" 600 ", 600)])
def test_parse_duration_reads_what_pandas_reads(text, seconds):
    assert search_plan.parse_duration(text) == seconds
