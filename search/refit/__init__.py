"""The refit and serving side: what is done with a finished search (`python -m search.refit_best`,
`python -m search.predict`, docs/refit.md).

One module a step of the refit: `best` (the command, the order), `find` (the search's best_config.json),
`data` (the search's data again), `train` (the members), `outputs` (the published files), `tracking` (the
MLflow runs); `ensemble` (members, folds, the averaged model, model.pt), `submission` (Kaggle's file, checked),
`registry` + `mlflow_model` (the registered pyfunc), `predict` (a model file on a folder of tifs).

The refit may import the search core (search.*: outcome, report, tracking, holdout, ...); the search core never
imports it.
"""
