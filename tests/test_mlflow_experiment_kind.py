"""Search experiments are model-training experiments in MLflow's UI (runs table), not GenAI ones (traces)."""
from __future__ import annotations

from search import tracking


def test_new_and_older_experiments_are_model_training_ones(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlf = tracking.client(uri)
    kind = {tracking.EXPERIMENT_KIND_TAG: tracking.MODEL_TRAINING_KIND}
    assert (tracking.EXPERIMENT_KIND_TAG, tracking.MODEL_TRAINING_KIND) == ("mlflow.experimentKind",
                                                                            "custom_model_development")

    new = tracking.experiment_id(mlf, "fresh")
    assert mlf.get_experiment(new).tags.items() >= kind.items()

    older = mlf.create_experiment("made-before")  # as an earlier version (or a user) created it: no kind
    assert tracking.EXPERIMENT_KIND_TAG not in mlf.get_experiment(older).tags
    assert tracking.experiment_id(mlf, "made-before") == older
    assert mlf.get_experiment(older).tags.items() >= kind.items()

    mine = mlf.create_experiment("user-kind", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    tracking.experiment_id(mlf, "user-kind")  # a kind the user chose is theirs to keep
    assert mlf.get_experiment(mine).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"

    mlf.delete_experiment(older)  # re-running a name deleted in the UI restores it, still a training experiment
    assert tracking.experiment_id(mlf, "made-before") == older
    exp = mlf.get_experiment(older)
    assert exp.lifecycle_stage == "active" and exp.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.MODEL_TRAINING_KIND
