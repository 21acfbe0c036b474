"""The registered model's code (MLflow "models from code"): copied into every registered model and run on load.

See search/refit/registry.py. Kept to this one statement because MLflow executes the file as a script.
"""
import mlflow

from search.refit.registry import PcamModel

mlflow.models.set_model(PcamModel())
