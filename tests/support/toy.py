"""A trainable whose validation AUC is a known function of its config and epoch, for testing the search itself.

A test double: it lives with the tests (``tests.support.toy``), not in the product. Ray pickles a function by
reference, so a worker imports this module by name: ``tests`` is a namespace package (no ``__init__.py``) found from
the repository root, which is on every worker's path (Ray adds the driver's working directory, and tests run from
the root with ``PYTHONPATH`` set to it; tests/conftest.py puts the root on ``sys.path`` and ``PYTHONPATH`` too). It
reports what `trainables.train.train_pcam` reports (epoch, val_auc, the objective best_val_auc/best_epoch,
trial_status), so the search's ASHA, TPE feedback, leaderboard and MLflow code run on it unchanged, in
milliseconds per epoch instead of minutes.

Config: ``quality`` in [0, 1] sets the curve ``auc(q, e) = 0.5 + 0.45 q (1 - 0.6^e)`` (rising, saturating,
ordered by q at every epoch, so ASHA's choices are predictable); ``behaviour`` "ok" | "diverge" (reports
diverged at ``at_epoch``) | "raise" (raises at ``at_epoch``); ``epochs`` (max epochs); ``epoch_seconds``
(sleep in every epoch after the first, for time-budget tests: the first result arrives at once).
"""
from __future__ import annotations

import time


def toy_auc(quality: float, epoch: int) -> float:
    return 0.5 + 0.45 * float(quality) * (1 - 0.6 ** int(epoch))


def toy_trainable(config: dict) -> None:
    from ray import tune

    epochs, at = int(config.get("epochs", 4)), int(config.get("at_epoch", 2))
    behaviour = config.get("behaviour", "ok")
    best, best_epoch = 0.0, 0
    for epoch in range(1, epochs + 1):
        auc = toy_auc(config.get("quality", 0.5), epoch)
        if auc > best:
            best, best_epoch = auc, epoch
        if epoch > 1:
            time.sleep(float(config.get("epoch_seconds", 0.0)))
        if behaviour == "raise" and epoch == at:
            raise ValueError(f"toy trainable raised at epoch {epoch}")
        if behaviour == "diverge" and epoch == at:
            tune.report({"epoch": epoch, "val_auc": 0.5, "best_val_auc": 0.5, "best_epoch": 0,
                         "trial_status": "diverged"})
            return
        tune.report({"epoch": epoch, "val_auc": auc, "best_val_auc": best, "best_epoch": best_epoch,
                     "trial_status": "completed" if epoch == epochs else "running"})
