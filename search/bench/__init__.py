"""Measurements of the search: does it pay, and on what evidence (`python -m search.bench`, docs/search.md).

- `search.bench.trials`: the real-trial bench (strategies on real patches, held-out AUC vs budget).
- `search.bench.record`: `python -m search.bench record`, the recorded learning-curve table.
- `search.bench.replay`, `search.bench.sim`: searches replayed on that table, the event-driven Tuner replay.
- `search.bench.recorded`: `python -m search.bench --recorded FILE`, the table, PNG and checks of the replay.
- `search.bench.cli`: the one command that dispatches to those.

Measurements may import the search core and the refit (search.refit); neither imports them.
"""
