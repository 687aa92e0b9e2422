"""One module per view; each exposes ``render(ctx)`` with a :class:`dashboard.views.Context`."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from dashboard import charts, data


@dataclass
class Context:
    """What every view gets: the log directory, the selected runs (fresh), their readers,
    the tidy table and its cache key, and the chart style chosen in the sidebar."""

    logdir: str
    runs: list[data.RunInfo]
    key: tuple
    table: pd.DataFrame
    readers: tuple
    style: charts.Style
    live: bool = False  # rendered inside a live-refresh fragment

    def run_table(self, name: str) -> pd.DataFrame:
        """The rows of one run."""
        return self.table[self.table["run"] == name] if len(self.runs) > 1 else self.table
