"""Reading runs: discover run directories and read their event files incrementally.

A run is a directory under the log directory holding ``events.out.tfevents.*`` files
(written by ``monitor.writer.EventWriter``) and, usually, ``run.json``. Event files use
TFRecord framing::

    uint64 length | uint32 masked_crc32c(length) | payload[length] | uint32 masked_crc32c(payload)

:class:`RunReader` remembers a byte offset per file, so a refresh parses only the records
appended since the last one. A record cut short at the end of a file (a job killed
mid-write, or a write in progress) stops the read there and is retried on the next refresh.
A record whose length checksum is wrong, or whose payload is not an ``Event``, marks the file
corrupt: what came before is kept and the error names the file and the byte offset. The
payload checksum is not verified (a pure-Python CRC-32C over tens of megabytes costs
seconds); a damaged payload almost always fails to parse instead. Steps laid out like an
earlier step are decoded by ``dashboard.wire`` without per-value Python work. A job resumed
from a checkpoint writes a ``SessionLog.START`` at its first step into a new file; as in
TensorBoard, what earlier files logged from that step on is then dropped (see
``dashboard.columns.superseded_mask``).

Values are stored by column (``dashboard.columns``: 4 bytes per value, one dense block per
step layout); readers return tidy tables with the columns ``run, step, wall_time, metric,
layer, value`` (:data:`COLUMNS`) built on demand for the metrics a view draws. Per-layer
tags ``<metric>/<parameter name>`` give ``metric`` and ``layer``; global tags
(``train/loss``, ``pss/tau``...) keep the whole tag as ``metric`` and an empty ``layer``.

Only the standard library, numpy, pandas, TensorBoard's protos and ``monitor.schema``
are imported here: never torch.
"""

from __future__ import annotations

import glob
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

from dashboard.columns import ColumnStore
from dashboard.wire import Templates
from monitor import safe_io, schema

COLUMNS = ("run", "step", "wall_time", "metric", "layer", "value")
TEXT_COLUMNS = ("run", "step", "wall_time", "tag", "text")
EVENT_GLOB = "events.out.tfevents.*"
LIVE_SECONDS = 120.0  # a running job that wrote nothing for this long is "stale"
MAX_RUN_FILE_BYTES = 8 * 2**20  # run.json: layer names and settings, a few kB to a few 100 kB
READ_CHUNK = 64 * 2**20  # event-file bytes held at once: a huge or hostile file costs no more
MAX_RECORD_BYTES = 256 * 2**20  # a larger record is taken as corrupt (ours are a few kB)
MAX_TABLES = 6  # tidy tables a reader keeps until new data (metrics a view draws)
_HEADER = 12  # uint64 length + uint32 crc
_FOOTER = 4  # uint32 crc of the payload


# ---------------------------------------------------------------------------------------
# Run discovery
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunInfo:
    """One run directory, as seen at discovery time."""

    name: str  # path relative to the log directory ("." for the log directory itself)
    path: str  # absolute, resolved path
    status: str  # "live", "finished", "interrupted", "crashed", "stale" or "no events"
    updated: float  # newest modification time of its event files and run.json
    layers: tuple[str, ...] = ()  # parameter names in model order (from run.json)
    meta: dict = field(default_factory=dict, compare=False, hash=False)  # run.json content


def read_run_file(run_dir: str) -> dict:
    """``run.json`` of a run, or ``{}`` when absent or unreadable (a run is valid without it).

    Read through ``monitor.safe_io``: a FIFO, a device, a huge or deeply nested file is
    not read (a FIFO would block the dashboard for good)."""
    try:
        data = safe_io.load_json(os.path.join(run_dir, schema.RUN_FILENAME), MAX_RUN_FILE_BYTES)
    except (OSError, ValueError):  # RefusedFile is a ValueError
        return {}
    return data if isinstance(data, dict) else {}


def run_status(meta: dict, updated: float, has_events: bool, now: float | None = None) -> str:
    """The state a run is in, from ``run.json`` (``monitor.runstate``) and its files.

    ``finished``, ``interrupted``, ``crashed``: what the job wrote when it ended.
    ``running`` becomes *live* while its process exists (``pid`` on this host) or, for a
    job on another host, while a file changed in the last LIVE_SECONDS; else *stale*
    (killed without a word: SIGKILL, out of memory, a lost node)."""
    status = meta.get("status")
    if status in schema.RUN_STATES and status != "running":
        return status
    if not has_events:
        return "no events"
    if status == "running":
        alive = process_alive(meta)
        if alive is not None:
            return "live" if alive else "stale"
        now = time.time() if now is None else now
        if now - updated <= LIVE_SECONDS:
            return "live"
    return "stale"


def process_alive(meta: dict) -> bool | None:
    """Whether the job's process still exists; None when that cannot be told here
    (no pid recorded, or the job ran on another host)."""
    pid, host = meta.get("pid"), meta.get("host")
    if not isinstance(pid, int) or host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def discover_runs(logdir: str) -> list[RunInfo]:
    """Every run under ``logdir`` (directories with event files or run.json), newest first."""
    root = os.path.realpath(logdir)
    if not os.path.isdir(root):
        return []
    runs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        events = [f for f in filenames if f.startswith("events.out.tfevents.")]
        if not events and schema.RUN_FILENAME not in filenames:
            continue
        meta = read_run_file(dirpath)
        mtimes = [_mtime(os.path.join(dirpath, f)) for f in events + [schema.RUN_FILENAME]]
        updated = max(mtimes)
        layers = meta.get("layers")
        layers = tuple(str(x) for x in layers) if isinstance(layers, list) else ()
        name = os.path.relpath(dirpath, root)
        runs.append(RunInfo(name=name, path=dirpath, status=run_status(meta, updated, bool(events)),
                            updated=updated, layers=layers, meta=meta))
    runs.sort(key=lambda r: (-r.updated, r.name))
    return runs


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def resolve_run_dir(logdir: str, run_name: str) -> str:
    """The absolute directory of ``run_name``, refusing anything outside ``logdir``.

    The dashboard writes only ``control.json`` inside a directory returned by this function.
    """
    root = os.path.realpath(logdir)
    path = os.path.realpath(os.path.join(root, run_name))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"run {run_name!r} is outside the log directory {root}")
    if not os.path.isdir(path):
        raise ValueError(f"run {run_name!r} does not exist under {root}")
    return path


# ---------------------------------------------------------------------------------------
# Incremental event reading
# ---------------------------------------------------------------------------------------


class _FileState:
    """Where reading one event file stopped, and what it found there."""

    def __init__(self, path: str, index: int) -> None:
        self.path = path
        self.offset = 0  # byte offset of the first record not read yet
        self.error: str | None = None  # set once the file is found corrupt; reading stops
        self.pending = 0  # bytes of an incomplete record at the end (retried next refresh)
        self.index = index  # order of the file in the run (event file names start with their time)


class RunReader:
    """Reads one run's event files incrementally into a :class:`dashboard.columns.ColumnStore`;
    thread-safe; never re-reads old records.

    ``refresh()`` parses what was appended since the last call (O(new records)).
    ``table(metrics)`` returns the tidy table of those metrics (all when None), built from
    the columns on demand and cached until new data arrives; ``texts()`` the text values.
    ``version`` counts refreshes that found new data, to key caches of derived data.
    """

    def __init__(self, run_dir: str, name: str | None = None) -> None:
        self.run_dir = os.path.realpath(run_dir)
        self.name = name if name is not None else os.path.basename(self.run_dir)
        self.version = 0
        self._lock = threading.Lock()
        self._files: dict[str, _FileState] = {}
        self._store = ColumnStore()
        self._texts: list[tuple[int, float, str, str]] = []
        self._templates = Templates()  # fast decoding of step layouts seen before
        self._tables: dict[tuple | None, pd.DataFrame] = {}  # metrics -> table, this version
        self._tag_split: tuple | None = None  # _split_tags of the tags, until a new tag

    # ------------------------------------------------------------------ reading
    def refresh(self) -> int:
        """Read new records from every event file; returns the number of new events."""
        with self._lock:
            paths = sorted(glob.glob(os.path.join(glob.escape(self.run_dir), EVENT_GLOB)))
            new = 0
            for path in paths:
                if path not in self._files:
                    self._files[path] = _FileState(path, len(self._files))
                state = self._files[path]
                if state.error is None:
                    new += self._read_file(state)
            if new:
                self.version += 1
                self._tables = {}
            return new

    def _read_file(self, state: _FileState) -> int:
        """Parse what was appended to one file, at most ``READ_CHUNK`` bytes at a time, into
        one reused buffer (``readinto``: no new allocation per chunk)."""
        events = 0
        try:  # regular files only: a FIFO would block, /dev/zero never ends
            fd, _ = safe_io.open_regular(state.path)
            with os.fdopen(fd, "rb", buffering=0) as fh:
                file_size = os.fstat(fh.fileno()).st_size
                if file_size - state.offset <= state.pending:  # nothing appended since
                    return 0
                want, buf = READ_CHUNK, bytearray()
                while True:
                    size = min(want, file_size - state.offset)
                    if size <= 0:
                        return events
                    if len(buf) != size:
                        buf = bytearray(size)
                    fh.seek(state.offset)
                    n = fh.readinto(buf) or 0
                    with memoryview(buf) as view:
                        new, used = self._parse(state, view[:n])
                    events += new
                    if state.error is not None or n < size:
                        return events
                    want = READ_CHUNK if used else self._whole_record(state, buf)
                    if not want or (not used and want > file_size - state.offset):
                        return events  # corrupt, or a long record not complete yet
        except safe_io.RefusedFile as err:
            state.error = str(err)
        except OSError as err:
            state.error = f"cannot read {state.path}: {err}"
        return events

    @staticmethod
    def _whole_record(state: _FileState, data) -> int:
        """Bytes of the record at the start of ``data`` when it is longer than a chunk;
        0 (and the file marked corrupt) when longer than any event."""
        (length,) = struct.unpack_from("<Q", data, 0)
        if length + _HEADER + _FOOTER > MAX_RECORD_BYTES:
            state.error = (f"{os.path.basename(state.path)} is corrupt at byte {state.offset}: "
                           f"a record of {length:,} bytes, more than {MAX_RECORD_BYTES:,}")
            return 0
        return length + _HEADER + _FOOTER

    def _parse(self, state: _FileState, data: memoryview) -> tuple[int, int]:
        """Parse the records in ``data`` (read at ``state.offset``); ``(events, bytes used)``.

        Payloads are memoryview slices of the read buffer: a step laid out like an earlier
        one is decoded from there by ``dashboard.wire`` with no copy."""
        pos, end, events = 0, len(data), 0
        while pos + _HEADER <= end:
            (length, length_crc) = struct.unpack_from("<QI", data, pos)
            if masked_crc32c(data[pos:pos + 8].tobytes()) != length_crc:
                state.error = (f"{os.path.basename(state.path)} is corrupt at byte "
                               f"{state.offset + pos}: bad record-length checksum")
                break
            stop = pos + _HEADER + length + _FOOTER
            if stop > end:
                break  # incomplete record: the writer is mid-write or was killed; retry later
            payload = data[pos + _HEADER:pos + _HEADER + length]
            decoded = self._templates.decode(payload)  # a step laid out like an earlier one
            if decoded is None:
                try:
                    event = Event.FromString(payload.tobytes())
                except Exception as err:  # protobuf DecodeError, or what a bad payload raises
                    state.error = (f"{os.path.basename(state.path)} is corrupt at byte "
                                   f"{state.offset + pos}: the record is not an event ({err})")
                    break
                decoded = self._collect(event, state.index)
                if decoded is not None and decoded[4]:
                    self._templates.learn(payload, decoded[2])
            events += 1
            pos = stop
            if decoded is not None and len(decoded[2]):
                self._store.add(decoded[1], decoded[0], state.index, decoded[2], decoded[3])
        state.pending = end - pos if state.error is None else 0
        state.offset += pos
        return events, pos

    def _collect(self, event: Event, file: int):
        """``(wall_time, step, codes, values, scalars_only)`` of an event's summary (texts
        are kept aside); None for events without a summary (a session start is noted)."""
        if not event.HasField("summary"):
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                self._store.restarts.append((file, event.step))
            return None
        codes: list[int] = []
        values: list[float] = []
        scalars_only = True
        for value in event.summary.value:
            kind = value.WhichOneof("value")
            if kind == "simple_value":
                codes.append(self._store.code(value.tag))
                values.append(value.simple_value)
                continue
            scalars_only = False
            if kind == "tensor" and value.tag.endswith(schema.TEXT_SUFFIX):
                strings = value.tensor.string_val
                if strings:
                    text = strings[0].decode("utf-8", "replace")
                    tag = value.tag[: -len(schema.TEXT_SUFFIX)]
                    self._texts.append((event.step, event.wall_time, tag, text))
        return event.wall_time, event.step, codes, values, scalars_only

    # ------------------------------------------------------------------ results
    @property
    def errors(self) -> list[str]:
        """Corrupt or unreadable files (reading them stopped at the bad record)."""
        return [s.error for s in self._files.values() if s.error]

    @property
    def pending_bytes(self) -> int:
        """Bytes of incomplete records at the ends of files (truncated or being written)."""
        return sum(s.pending for s in self._files.values())

    @property
    def n_files(self) -> int:
        return len(self._files)

    @property
    def n_values(self) -> int:
        """Scalars read so far (before a restart drops any)."""
        return self._store.values

    def metrics(self) -> list[str]:
        """Metric names with at least one value (``metric`` of the tidy table), in the order
        their tags first appeared."""
        with self._lock:
            metric_of, _, metrics, _ = self._split()
            present = np.unique(metric_of[self._store.present()])
            return [metrics[i] for i in present]

    def layers(self, metric: str | None = None) -> list[str]:
        """Layer names with a value (of ``metric``), in order of their tags' first appearance."""
        with self._lock:
            metric_of, layer_of, metrics, layers = self._split()
            codes = self._store.present()
            if metric is not None:
                codes = codes[metric_of[codes] == metrics.index(metric)] if metric in metrics \
                    else codes[:0]
            return [layers[i] for i in np.unique(layer_of[codes]) if layers[i]]

    def step_times(self) -> tuple[np.ndarray, np.ndarray]:
        """Each logged step once (sorted) with its wall time: progress, speed and ETA."""
        with self._lock:
            return self._store.step_times()

    def heatmap(self, metric: str, layers) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, Z)`` of ``metric`` with ``Z[i, j]`` the value of ``layers[i]`` at
        ``steps[j]`` (NaN: none), read from the columns without a tidy table; unbinned
        (``charts.bin_columns`` bins it)."""
        with self._lock:
            code = {tag: i for i, tag in enumerate(self._store.tags)}
            codes = np.array([code.get(schema.layer_tag(metric, name), -1) for name in layers],
                             np.int64)
            return self._store.matrix(codes)

    def table(self, metrics=None) -> pd.DataFrame:
        """The tidy table of ``metrics`` (names as in its ``metric`` column; every metric
        when None), cached until new data arrives."""
        key = None if metrics is None else tuple(sorted(set(metrics)))
        with self._lock:
            table = self._tables.pop(key, None)
            if table is None:
                table = self._build_table(key)
            self._tables[key] = table  # most recent last
            while len(self._tables) > MAX_TABLES:  # a table of one 7B metric: ~80 MB
                self._tables.pop(next(iter(self._tables)))
            return table

    def nonfinite_table(self) -> pd.DataFrame:
        """The tidy rows of every NaN or infinite value read (noted as they arrived, so
        finding them does not read every metric)."""
        with self._lock:
            if "nonfinite" not in self._tables:
                self._tables["nonfinite"] = self._frame(*self._store.nonfinite_rows())
            return self._tables["nonfinite"]

    def _codes(self, metrics: tuple | None) -> np.ndarray | None:
        if metrics is None:
            return None
        metric_of, _, names, _ = self._split()
        wanted = [names.index(m) for m in metrics if m in names]
        return np.flatnonzero(np.isin(metric_of, wanted)).astype(np.int32)

    def _split(self) -> tuple:
        if self._tag_split is None or len(self._tag_split[0]) != len(self._store.tags):
            self._tag_split = _split_tags(self._store.tags)
        return self._tag_split

    def _build_table(self, metrics: tuple | None) -> pd.DataFrame:
        return self._frame(*self._store.rows(self._codes(metrics)))

    def _frame(self, step, wall, code, value) -> pd.DataFrame:
        metric_of, layer_of, metrics, layers = self._split()
        return pd.DataFrame({
            "run": pd.Categorical.from_codes(np.zeros(len(step), np.int8), [self.name]),
            "step": step,
            "wall_time": wall,
            "metric": pd.Categorical.from_codes(metric_of[code], metrics),
            "layer": pd.Categorical.from_codes(layer_of[code], layers),
            "value": value,
        }, copy=False)  # no copy into one 2-D block per dtype: 0.1 s per million rows

    def texts(self) -> pd.DataFrame:
        with self._lock:
            rows = list(self._texts)
        frame = pd.DataFrame(rows, columns=list(TEXT_COLUMNS[1:]))
        frame.insert(0, "run", self.name)
        return frame


def _split_tags(tags: list[str]) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Code arrays mapping tag code -> metric code and layer code, and the category lists."""
    metrics: dict[str, int] = {}
    layers: dict[str, int] = {"": 0}
    metric_of = np.zeros(len(tags), np.int32)
    layer_of = np.zeros(len(tags), np.int32)
    for i, tag in enumerate(tags):
        if schema.is_layer_tag(tag):
            metric, layer = schema.split_tag(tag)
        else:
            metric, layer = tag, ""
        metric_of[i] = metrics.setdefault(metric, len(metrics))
        layer_of[i] = layers.setdefault(layer, len(layers))
    return metric_of, layer_of, list(metrics), list(layers)


def combine(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate tidy tables of several runs, keeping categorical columns categorical.

    Empty tables (a run with only ``run.json``, or unreadable events) add no rows and are
    left out: their categories are untyped (object) where a read run's are strings, and
    ``union_categoricals`` refuses to mix the two.
    """
    tables = [t for t in tables if t is not None and len(t)]
    if not tables:
        return empty_table()
    if len(tables) == 1:
        return tables[0]
    out = {}
    for col in COLUMNS:
        parts = [t[col] for t in tables]
        if isinstance(parts[0].dtype, pd.CategoricalDtype):
            out[col] = pd.api.types.union_categoricals(parts, ignore_order=True)
        else:
            out[col] = np.concatenate([p.to_numpy() for p in parts])
    return pd.DataFrame(out)


def empty_table() -> pd.DataFrame:
    return pd.DataFrame({"run": pd.Categorical([]), "step": np.empty(0, np.int64),
                         "wall_time": np.empty(0), "metric": pd.Categorical([]),
                         "layer": pd.Categorical([]), "value": np.empty(0)})


def write_control(run_dir: str, settings: schema.PSSConfig, *, smooth_now: bool = False
                  ) -> tuple[schema.ControlFile | None, str | None]:
    """``monitor.schema.write_control`` for a page: ``(written, None)`` or ``(None, why not)``,
    e.g. when ``control.json`` is a directory or the run directory is not writable."""
    try:
        return schema.write_control(run_dir, settings, smooth_now=smooth_now), None
    except (OSError, schema.ControlError) as err:
        return None, f"control.json was not written: {err}"


class RunStore:
    """One :class:`RunReader` per run directory of a log directory (shared by all sessions)."""

    def __init__(self, logdir: str) -> None:
        self.logdir = logdir
        self._readers: dict[str, RunReader] = {}
        self._lock = threading.Lock()

    def readers(self) -> list[RunReader]:
        with self._lock:
            return list(self._readers.values())

    def reader(self, run: RunInfo) -> RunReader:
        with self._lock:
            reader = self._readers.get(run.path)
            if reader is None:
                reader = self._readers[run.path] = RunReader(run.path, run.name)
            return reader
