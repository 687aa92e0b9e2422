"""One module per view; each exposes ``render(ctx)`` with a :class:`dashboard.views.Context`."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from dashboard import cache, charts, data
from monitor import schema


@dataclass
class Context:
    """What every view gets: the log directory, the selected runs (fresh), their readers and
    their cache key, and the chart style chosen in the sidebar.

    Views ask for the tidy rows of the metrics they draw (:meth:`rows`): on the run of a
    large model (27M scalars) a table of every metric costs seconds and GBs, one metric's
    rows a tenth of that."""

    logdir: str
    runs: list[data.RunInfo]
    key: tuple
    readers: tuple
    style: charts.Style
    live: bool = False  # rendered inside a live-refresh fragment

    def rows(self, *metrics: str) -> pd.DataFrame:
        """The tidy rows of ``metrics`` (names of the ``metric`` column) of every run."""
        return cache.rows(self.key, tuple(sorted(set(metrics))), self.readers)

    def run_rows(self, name: str, *metrics: str) -> pd.DataFrame:
        """The rows of ``metrics`` of one run."""
        table = self.rows(*metrics)
        return table[table["run"] == name] if len(self.runs) > 1 else table

    def metrics(self) -> list[str]:
        """Every metric with a value in some run."""
        return cache.metrics(self.key, self.readers)

    def layer_metrics(self) -> list[str]:
        """Per-layer metrics present, in the schema's order."""
        present = set(self.metrics())
        return [k for k in schema.METRIC_KEYS + schema.PSS_LAYER_METRICS if k in present]

    def layers(self, metric: str | None = None) -> list[str]:
        """Layers with a value (of ``metric``) in some run, in order of first appearance."""
        return cache.layers(self.key, metric, self.readers)

    def reader(self, name: str) -> data.RunReader:
        return next(r for run, r in zip(self.runs, self.readers) if run.name == name)

    @property
    def empty(self) -> bool:
        return not any(r.n_values for r in self.readers)
