"""Batched TensorBoard event writing: one event per logged step, carrying all its values.

Records are built by pure functions over TensorBoard's own protos; ``EventWriter`` only
does the I/O (TensorBoard's ``EventFileWriter``, which owns the file naming, framing and
CRCs). One event with many values is about 13x faster to write and half the size of one
event per scalar (SPEC 5); ``benchmarks/bench_overhead.py`` measures it again.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Mapping

from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from torch.utils.tensorboard.summary import custom_scalars, text

from monitor.schema import METRIC_KEYS, PSS_LAYER_METRICS


def scalar_values(scalars: Mapping[str, float]) -> list[Summary.Value]:
    """Summary values for a mapping of tag -> number (non-finite values are kept as is)."""
    return [Summary.Value(tag=tag, simple_value=float(value)) for tag, value in scalars.items()]


def text_values(texts: Mapping[str, str]) -> list[Summary.Value]:
    """Summary values for TensorBoard's text plugin (tag -> markdown string)."""
    out: list[Summary.Value] = []
    for tag, body in texts.items():
        out.extend(text(tag, body).value)
    return out


def step_event(step: int, scalars: Mapping[str, float], texts: Mapping[str, str] | None = None,
               wall_time: float | None = None) -> Event:
    """One event holding every value of one logged step."""
    values = scalar_values(scalars)
    if texts:
        values.extend(text_values(texts))
    return Event(step=int(step), wall_time=time.time() if wall_time is None else wall_time,
                 summary=Summary(value=values))


MAX_CHART_LINES = 12  # layers per custom-scalars chart: more is unreadable


def layer_groups(layers: Iterable[str], max_lines: int = MAX_CHART_LINES) -> dict[str, list[str]]:
    """Layers grouped by kind: the name with its block numbers as ``*``
    (``h.3.attn.c_attn.weight`` -> ``h.*.attn.c_attn.weight``), so one chart compares one
    kind of layer across depth. Kinds with a single layer share a chart ``other``; a group
    of more than ``max_lines`` layers is cut into charts ``kind [i]`` of consecutive layers."""
    kinds: dict[str, list[str]] = {}
    for name in layers:
        kinds.setdefault(re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "*", name), []).append(name)
    merged: dict[str, list[str]] = {}
    for kind, names in kinds.items():
        merged.setdefault(kind if len(names) > 1 else "other", []).extend(names)
    out: dict[str, list[str]] = {}
    for kind, names in merged.items():
        chunks = [names[i:i + max_lines] for i in range(0, len(names), max_lines)]
        for i, chunk in enumerate(chunks):
            out[kind if len(chunks) == 1 else f"{kind} [{i + 1}]"] = chunk
    return out


def default_layout(global_tags: Iterable[str] = (), layers: Iterable[str] = ()) -> Summary:
    """Custom-scalars layout: per metric, one chart per kind of layer (``layer_groups``),
    each with at most MAX_CHART_LINES lines; without ``layers``, one chart per metric
    holding every layer."""
    groups = layer_groups(layers)
    if groups:
        layout = {key: {f"{key} · {kind}": ["Multiline", [f"^{re.escape(f'{key}/{n}')}$"
                                                          for n in names]]
                        for kind, names in groups.items()}
                  for key in METRIC_KEYS + PSS_LAYER_METRICS}
    else:
        layout = {"per-layer metrics": {k: ["Multiline", [rf"^{k}/.*"]] for k in METRIC_KEYS},
                  "PSS per layer": {k: ["Multiline", [rf"^{k}/.*"]] for k in PSS_LAYER_METRICS}}
    tags = list(global_tags)
    if tags:
        layout["global"] = {tag: ["Multiline", [rf"^{tag}$"]] for tag in tags}
    return custom_scalars(layout)


class EventWriter:
    """Writes step events into ``logdir`` itself (no sub-run directories).

    ``close()`` is safe to call twice; the writer is a context manager.
    """

    def __init__(self, logdir: str | os.PathLike[str], *, filename_suffix: str = "") -> None:
        self.logdir = os.fspath(logdir)
        try:
            os.makedirs(self.logdir, exist_ok=True)
        except (FileExistsError, NotADirectoryError):  # the path, or a parent, is a file
            raise NotADirectoryError(f"logdir {self.logdir!r}: a file is in the way (the path or "
                                     "one of its parents is a file, not a directory); pass a "
                                     "directory path for the run's event files") from None
        self._writer: EventFileWriter | None = EventFileWriter(
            self.logdir, max_queue_size=1000, flush_secs=30, filename_suffix=filename_suffix)
        self.path: str = self._writer._file_name  # TensorBoard exposes no public getter

    def write(self, step: int, scalars: Mapping[str, float],
              texts: Mapping[str, str] | None = None, *, flush: bool = True) -> None:
        """Write one event for ``step``; flush by default so a killed job loses little."""
        if self._writer is None:
            raise RuntimeError(f"EventWriter for {self.logdir} is closed")
        self._writer.add_event(step_event(step, scalars, texts))
        if flush:
            self._writer.flush()

    def write_summary(self, summary: Summary, step: int = 0) -> None:
        if self._writer is None:
            raise RuntimeError(f"EventWriter for {self.logdir} is closed")
        self._writer.add_event(Event(step=step, wall_time=time.time(), summary=summary))

    def write_session_start(self, step: int) -> None:
        """Mark a job resumed at ``step``: TensorBoard (and the dashboard) then drop what
        earlier files of this run logged at ``step`` or later (orphaned by the restart)."""
        if self._writer is None:
            raise RuntimeError(f"EventWriter for {self.logdir} is closed")
        self._writer.add_event(Event(step=step, wall_time=time.time(),
                                     session_log=SessionLog(status=SessionLog.START)))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "EventWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
