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


def test_ui_links_open_the_model_training_views(tmp_path):
    import json
    from urllib.parse import parse_qs

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking.experiment_url(uri, "none-yet") == \
        "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
    exp_id = tracking.experiment_id(tracking.client(uri), "search")
    assert tracking.experiment_url(uri, "search") == \
        f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs?workflowType=machine_learning"
    url = tracking.curves_url(exp_id, ["a1", "b2"])
    route, query = url.split("#", 1)[1].split("?", 1)
    q = {k: v[0] for k, v in parse_qs(query).items()}
    assert route == "/metric" and json.loads(q["runs"]) == ["a1", "b2"] and json.loads(q["experiments"]) == [exp_id]
    assert json.loads(q["metric"]) == "val_auc" and json.loads(q["plot_metric_keys"]) == ["val_auc"]
    assert q["x_axis"] == "step" and q["workflowType"] == "machine_learning"
