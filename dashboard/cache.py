"""The app's cached layer: one reader per run (shared by sessions), cached transforms.

Load (``load``: refresh each reader, read only new events) -> transform (``cached_*``,
keyed by the readers' versions) -> render (the views). Views never open files themselves.
"""

from __future__ import annotations

import os

import streamlit as st

from dashboard import alerts, charts, data, transforms
from monitor.pss import inputs


@st.cache_resource(show_spinner=False)
def run_store(logdir: str) -> data.RunStore:
    return data.RunStore(logdir)


@st.cache_resource(show_spinner=False, max_entries=8)
def rows(key: tuple, metrics: tuple[str, ...], _readers: tuple):
    """The tidy rows of ``metrics`` of the selected runs; ``key`` holds (run dir, version)
    pairs. Built from the readers' columns for these metrics only."""
    return data.combine([r.table(metrics) for r in _readers])


@st.cache_data(show_spinner=False, max_entries=16)
def metrics(key: tuple, _readers: tuple) -> list[str]:
    found: list[str] = []
    for reader in _readers:
        found += [m for m in reader.metrics() if m not in found]
    return found


@st.cache_data(show_spinner=False, max_entries=32)
def layers(key: tuple, metric: str | None, _readers: tuple) -> list[str]:
    found: list[str] = []
    for reader in _readers:
        found += [name for name in reader.layers(metric) if name not in found]
    return found


@st.cache_data(show_spinner=False, max_entries=32)
def heatmap(key: tuple, metric: str, layers: tuple[str, ...], scale: str, _reader):
    """One run's layer x step matrix of ``metric``, read from its columns, binned."""
    steps, z = charts.bin_columns(*_reader.heatmap(metric, layers))
    return steps, transforms.relative_rows(z, scale)


@st.cache_data(show_spinner=False, max_entries=8)
def found_alerts(key: tuple, _readers: tuple):
    """The alerts of the selected runs, from the tables of the metrics they read (shared
    with the charts) and the non-finite values noted while reading."""
    return alerts.alerts_in(lambda *m: rows(key, tuple(sorted(set(m))), _readers),
                            metrics(key, _readers),
                            data.combine([r.nonfinite_table() for r in _readers]))


@st.cache_data(show_spinner=False, max_entries=16)
def moved(key: tuple, metric: str, _table) -> list[str]:
    return list(transforms.movement(_table, metric).index)


@st.cache_data(show_spinner=False, max_entries=8)
def detector_inputs(run_dir: str, size: int, mtime: float):
    """The PSS detector's per-step input of a run (``pss_input.bin``), keyed by its size."""
    return inputs.read_inputs(run_dir)


def detector_input_of(run_dir: str):
    """Segments of ``run_dir``'s detector input, or None when it has none."""
    path = os.path.join(run_dir, inputs.PSS_INPUT_FILENAME)
    try:
        info = os.stat(path)
    except OSError:
        return None
    return detector_inputs(run_dir, info.st_size, info.st_mtime)


def fresh_runs(logdir: str, names) -> list[data.RunInfo]:
    """The runs called ``names``, re-discovered now (state, last update): a live refresh
    must not show what the page knew when it was first drawn."""
    by_name = {r.name: r for r in data.discover_runs(logdir)}
    return [by_name[n] for n in names if n in by_name]


def load(logdir: str, runs: list[data.RunInfo]):
    """Refresh the readers of ``runs`` (new events only) and return (key, readers)."""
    store = run_store(os.path.realpath(logdir))
    readers = tuple(store.reader(r) for r in runs)
    for reader in readers:
        reader.refresh()
    key = tuple((r.run_dir, r.version) for r in readers)
    return key, readers


def model_order(runs: list[data.RunInfo]) -> list[str]:
    order: list[str] = []
    for run in runs:
        order += [name for name in run.layers if name not in order]
    return order
