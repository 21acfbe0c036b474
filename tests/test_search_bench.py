"""search.bench (search.bench.trials): the incumbent bookkeeping (fast), and a whole tiny bench run on synthetic data (slow)."""
from __future__ import annotations

import pytest

from search.bench import trials as bench


def _result(auc, epoch, status="running"):
    return {"best_val_auc": auc, "best_epoch": epoch, "epoch": epoch, "trial_status": status}


def test_recorder_follows_the_incumbent_and_its_checkpoint_and_stops_at_the_budget():
    r = bench.Recorder(budget=5)
    r("a", _result(0.70, 1))
    r("b", _result(0.80, 1))
    r("a", _result(0.75, 1))  # a's best is still epoch 1... its objective rises to 0.75 but b leads
    r("b", _result(0.50, 2, "diverged"))  # b FAILED: a becomes the incumbent again
    assert not r.stop_all()
    r("a", _result(0.85, 3))
    assert r.stop_all()
    r("c", _result(0.99, 1))  # past the budget: not counted
    assert [(u, v, k) for u, v, k in r.curve] == [
        (1, 0.70, ("a", 1)), (2, 0.80, ("b", 1)), (3, 0.80, ("b", 1)), (4, 0.75, ("a", 1)), (5, 0.85, ("a", 3))]


def test_budget_points_and_the_budget_to_reach_a_target():
    curve = [(1, 0.7, 0.60), (2, 0.8, 0.65), (4, 0.9, 0.72)]
    assert bench.at_budget(curve, 1) == 0.60 and bench.at_budget(curve, 3) == 0.65 and bench.at_budget(curve, 9) == 0.72
    assert bench.at_budget(curve, 0) != bench.at_budget(curve, 0)  # nan before the first result
    assert bench.budget_to_reach(curve, 0.65, 4) == 2 and bench.budget_to_reach(curve, 0.8, 4) is None


@pytest.mark.slow
def test_tiny_bench_runs_every_strategy_and_writes_the_png(tmp_path, capsys):
    out = tmp_path / "bench.png"
    assert bench.main(["--synthetic", "--synthetic-n", "300", "--cache-dir", str(tmp_path / "c"), "--seeds", "2",
                       "--budget", "4", "--max-epochs", "2", "--max-train-samples", "64", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for s in bench.STRATEGIES:
        assert printed.count(f"{s:15s} seed") == 2
    assert "held-out AUC of the incumbent vs budget" in printed and out.stat().st_size > 5000
