"""The refit's model in the MLflow registry, with no pickle anywhere.

MLflow's own PyTorch flavour pickles the network (``serialization_format="pickle"``, which MLflow warns
about on every save) or exports a torch.export graph ("pt2") that cannot run predict_proba's 8-view TTA
or average an ensemble. So the registered model is a pyfunc *from code*: the code is
search/refit/mlflow_model.py (copied into the model, executed on load, never unpickled) and its one
artifact is the refit's model.pt (tensors and containers, read with ``torch.load(weights_only=True)``).

Contract: input uint8 images (N, 96, 96, 3) as Kaggle's tifs hold them; output float P(tumour) per
image, the same numbers as the submission (params ``tta`` (default True) and ``batch_size``).
Loading needs pcam-tune importable (the networks' classes live in trainables.models).
"""
from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np

MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
DEFAULT_PARAMS = {"tta": True, "batch_size": 256}


class PcamModel(mlflow.pyfunc.PythonModel):
    """The refit's model (one network or an ensemble) behind MLflow's pyfunc interface."""

    def load_context(self, context) -> None:
        from search.refit.ensemble import load_ensemble

        self.ensemble = load_ensemble(context.artifacts["model"])

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        params = {**DEFAULT_PARAMS, **(params or {})}
        images = np.asarray(model_input, dtype=np.uint8)
        return self.ensemble.predict_proba(images, tta=bool(params["tta"]), batch_size=int(params["batch_size"]))


def log_registered_model(model_file: Path, registered_name: str, example_images: np.ndarray):
    """Log ``model_file`` as the pyfunc into the active run and register it; returns MLflow's ModelInfo."""
    return mlflow.pyfunc.log_model(
        name="model", python_model=str(MODEL_CODE), artifacts={"model": str(model_file)},
        registered_model_name=registered_name, input_example=(example_images, DEFAULT_PARAMS),
        pip_requirements=pinned_requirements(),
    )


def pinned_requirements() -> list[str]:
    """The model's pip requirements, given so MLflow skips its slow (~20 s) inference subprocess."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg).split('+')[0]}" for pkg in ("torch", "torchvision", "timm", "numpy", "numba", "mlflow")]
