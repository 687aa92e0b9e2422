"""The dashboard on the run of a 7B-class model: 300 tensors x 9 metrics x 10,000 logged
steps (27M scalars), against the targets first chart <= 3 s, refresh <= 0.3 s, RSS <= 2 GB.

    python benchmarks/bench_dashboard_7b.py            # writes benchmarks/results/dashboard_7b.md
    python benchmarks/bench_dashboard_7b.py --steps 1000   # a smaller honest version

Needs the ``bench`` extra (``crc32c``, a C CRC-32C: writing 1.4 GB of event files through
TensorBoard's pure-Python CRC would take most of an hour). The event file is written
directly in TFRecord framing, one event per step holding all 2,702 values, byte for byte
what ``EventWriter`` writes (checked: the first events are parsed back with the protobuf
decoder and compared).

Each measurement runs in a fresh subprocess, so its peak resident memory (``ru_maxrss``)
is its own:

1. ``tidy``: today's reader (``dashboard.data.RunReader``): read every event, build the
   tidy table, the stable-rank heatmap in model order, the figure as JSON;
2. ``columnar``: the design proposed for runs this size, prototyped here: a columnar cache
   (``step``, ``wall_time`` and one float32 ``step x layer`` file per metric, appended as
   events arrive, plus the tag list) that the reader fills once and then extends; a chart
   reads its metric's file (12 MB here, contiguous) and bins it straight into the heatmap,
   with no tidy table of 27M rows. Measured: building the cache from the events once (in
   64 MB chunks), the first chart from the cache, and a refresh (+10 steps: read them from
   the event file's last offset, append, redraw).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from dashboard import charts, data, wire  # noqa: E402
from monitor import schema  # noqa: E402
from monitor.writer import scalar_values  # noqa: E402
from tensorboard.compat.proto.summary_pb2 import Summary  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "dashboard_7b.md")
KINDS = ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.o_proj.weight",
         "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
         "input_layernorm.weight", "post_attention_layernorm.weight")
METRIC = "stable_rank"


def layer_names(n: int = 300) -> list[str]:
    return [f"model.layers.{i // len(KINDS)}.{KINDS[i % len(KINDS)]}" for i in range(n)]


def all_tags(layers: list[str]) -> list[str]:
    return ([schema.layer_tag(m, name) for m in schema.METRIC_KEYS for name in layers]
            + [schema.TAG_LOSS, schema.TAG_GLOBAL_GRAD_NORM])


# ---------------------------------------------------------------------------------------
# Writing the run fast, exactly as EventWriter would
# ---------------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _masked(data: bytes) -> int:
    import crc32c

    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class FastWriter:
    """Appends step events (all tags, one float32 each) to one event file."""

    def __init__(self, run_dir: str, tags: list[str]) -> None:
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, f"events.out.tfevents.{int(time.time())}.bench.7b")
        summary = Summary(value=scalar_values({t: 1.0 for t in tags})).SerializeToString()
        offsets = wire.float_offsets(summary, 0, len(summary))
        self.raw = np.frombuffer(summary, np.uint8).copy()
        self.gather = (np.asarray(offsets)[:, None] + np.arange(4)).ravel()
        self.rng = np.random.default_rng(0)
        self.n = len(tags)

    def write(self, steps: range) -> None:
        with open(self.path, "ab") as fh:
            for step in steps:
                values = self.rng.lognormal(0.0, 0.3, self.n).astype("<f4")
                self.raw[self.gather] = values.view(np.uint8)
                summary = self.raw.tobytes()
                payload = (b"\x09" + struct.pack("<d", time.time()) + b"\x10" + _varint(step)
                           + b"\x2a" + _varint(len(summary)) + summary)
                header = struct.pack("<Q", len(payload))
                fh.write(header + struct.pack("<I", _masked(header)) + payload
                         + struct.pack("<I", _masked(payload)))


def check_against_protobuf(path: str, tags: list[str]) -> None:
    """The first events parse with TensorBoard's own decoder into the expected tags."""
    from tensorboard.compat.proto.event_pb2 import Event

    with open(path, "rb") as fh:
        for _ in range(3):
            (length,) = struct.unpack("<Q", fh.read(8))
            fh.read(4)
            event = Event.FromString(fh.read(length))
            fh.read(4)
            assert [v.tag for v in event.summary.value] == tags


# ---------------------------------------------------------------------------------------
# Measurements (each in its own process)
# ---------------------------------------------------------------------------------------


def rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ``ru_maxrss`` on Linux, it does
    not inherit the parent's peak from before ``exec``)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def warm_up() -> None:
    """Plotly's first figure in a process pays its imports; the app's process has paid."""
    charts.heatmap_figure(["a"], np.arange(2), np.ones((1, 2)), METRIC).to_json()


def heatmap_json(table, layers) -> float:
    t0 = time.perf_counter()
    steps, z = charts.heatmap_matrix(table, METRIC, layers)
    charts.heatmap_figure(layers, steps, z, METRIC).to_json()
    return time.perf_counter() - t0


def measure_tidy(run_dir: str, layers: list[str], tags: list[str]) -> dict:
    t0 = time.perf_counter()
    reader = data.RunReader(run_dir, "7b")
    reader.refresh()
    t1 = time.perf_counter()
    table = reader.table()
    t2 = time.perf_counter()
    chart = heatmap_json(table, layers)
    first = {"read": t1 - t0, "table": t2 - t1, "chart": chart, "total": t2 - t0 + chart,
             "rows": len(table), "rss_first": rss_mb()}
    del table
    writer = FastWriter(run_dir, tags)
    writer.path = sorted(p for p in os.listdir(run_dir) if p.startswith("events"))[-1]
    writer.path = os.path.join(run_dir, writer.path)
    last = int(reader.table()["step"].max())
    writer.write(range(last + 1, last + 11))
    t0 = time.perf_counter()
    reader.refresh()
    refresh = time.perf_counter() - t0 + heatmap_json(reader.table(), layers)
    return {**first, "refresh": refresh, "rss": rss_mb()}


class ColumnCache:
    """The proposed columnar cache (prototype): in ``cache_dir``, ``steps.i64``,
    ``wall.f64`` and one ``<metric>.f32`` per metric (row-major step x layer), appended
    from the event file's last read offset; a chart reads one metric's file, contiguous.
    Assumes every step event has the same tags (the monitor's layout); a step with other
    tags would start a new block of files (not prototyped)."""

    CHUNK = 64 << 20  # bytes of event file parsed at a time: bounds the build's memory

    def __init__(self, run_dir: str, cache_dir: str) -> None:
        self.run_dir, self.dir = run_dir, cache_dir
        os.makedirs(cache_dir, exist_ok=True)
        self.meta_path = os.path.join(cache_dir, "meta.json")  # offset and rows, per update
        self.tags_path = os.path.join(cache_dir, "tags.json")  # written once
        self.meta = (json.load(open(self.meta_path)) if os.path.exists(self.meta_path)
                     else {"offset": 0, "rows": 0})
        self.meta["tags"] = (json.load(open(self.tags_path)) if os.path.exists(self.tags_path)
                             else None)
        self._columns: dict[str, list[int]] | None = None
        self.templates = wire.Templates()  # kept across updates, as a live reader would
        self._loaded: dict[str, np.ndarray] = {}  # metric -> (steps, layers) block in memory
        self._steps: np.ndarray | None = None

    def update(self) -> int:
        """Append the events written since the last update; returns their number."""
        path = sorted(os.path.join(self.run_dir, p) for p in os.listdir(self.run_dir)
                      if p.startswith("events.out.tfevents."))[-1]
        added = 0
        with open(path, "rb") as fh:
            while True:
                fh.seek(self.meta["offset"])
                buf = fh.read(self.CHUNK)
                used, n = self._append(buf)
                self.meta["offset"] += used
                added += n
                if len(buf) < self.CHUNK or not used:
                    break
        self.meta["rows"] += added
        if self.meta["tags"] and not os.path.exists(self.tags_path):
            with open(self.tags_path, "w") as fh:
                json.dump(self.meta["tags"], fh)
        with open(self.meta_path, "w") as fh:
            json.dump({"offset": self.meta["offset"], "rows": self.meta["rows"]}, fh)
        return added

    def _append(self, buf: bytes) -> tuple[int, int]:
        pos, steps, walls, rows = 0, [], [], []
        while pos + 12 <= len(buf):
            (length,) = struct.unpack_from("<Q", buf, pos)
            stop = pos + 12 + length + 4
            if stop > len(buf):
                break
            payload = buf[pos + 12:pos + 12 + length]
            decoded = self.templates.decode(payload)
            if decoded is None:  # learn the layout from the protobuf decoder once
                from tensorboard.compat.proto.event_pb2 import Event

                event = Event.FromString(payload)
                self.meta["tags"] = self.meta["tags"] or [v.tag for v in event.summary.value]
                values = [v.simple_value for v in event.summary.value]
                self.templates.learn(payload, list(range(len(values))))
                decoded = (event.wall_time, event.step, None, np.asarray(values))
            steps.append(decoded[1])
            walls.append(decoded[0])
            rows.append(np.asarray(decoded[3], np.float32))
            pos = stop
        if rows:
            matrix = np.stack(rows)  # (new steps, tags)
            self._write("steps.i64", np.asarray(steps, np.int64))
            self._write("wall.f64", np.asarray(walls, np.float64))
            for metric, cols in self.columns().items():
                self._write(f"{metric}.f32", matrix[:, cols[0]:cols[-1] + 1])
                if metric in self._loaded:  # extend what a chart already holds
                    self._loaded[metric] = np.concatenate(
                        [self._loaded[metric], matrix[:, cols[0]:cols[-1] + 1]])
            if self._steps is not None:
                self._steps = np.concatenate([self._steps, np.asarray(steps, np.int64)])
        return pos, len(rows)

    def _write(self, name: str, arr: np.ndarray) -> None:
        with open(os.path.join(self.dir, name.replace("/", "~")), "ab") as out:
            out.write(np.ascontiguousarray(arr).tobytes())

    def columns(self) -> dict[str, list[int]]:
        """Tag columns per metric (contiguous: the monitor writes tags metric by metric)."""
        if self._columns is None and self.meta["tags"]:
            self._columns = {}
            for i, tag in enumerate(self.meta["tags"]):
                metric = schema.split_tag(tag)[0] if schema.is_layer_tag(tag) else tag
                self._columns.setdefault(metric, []).append(i)
        return self._columns or {}

    def heatmap(self, metric: str, layers: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(steps, Z) of one metric, layers in the given order, binned like the app's."""
        tags = self.meta["tags"]
        cols = self.columns()[metric]
        names = [schema.split_tag(tags[i])[1] for i in cols]
        if metric not in self._loaded:
            block = np.fromfile(os.path.join(self.dir, f"{metric}.f32"), np.float32)
            self._loaded[metric] = block.reshape(-1, len(cols))  # (steps, layers)
        if self._steps is None:
            self._steps = np.fromfile(os.path.join(self.dir, "steps.i64"), np.int64)
        block, steps = self._loaded[metric], self._steps
        row = {name: i for i, name in enumerate(names)}
        # bin first, on the block's own memory order (a view, no copy), then reorder
        steps, z = charts.bin_columns(steps, block.T)
        return steps, z[[row[name] for name in layers]].astype(np.float64)


def measure_columnar(run_dir: str, layers: list[str], tags: list[str]) -> dict:
    t0 = time.perf_counter()
    ColumnCache(run_dir, run_dir + ".cache").update()
    return {"build": time.perf_counter() - t0, "rss_build": rss_mb()}


def measure_columnar_chart(run_dir: str, layers: list[str], tags: list[str]) -> dict:
    t0 = time.perf_counter()
    cache = ColumnCache(run_dir, run_dir + ".cache")
    steps, z = cache.heatmap(METRIC, layers)
    t1 = time.perf_counter()
    charts.heatmap_figure(layers, steps, z, METRIC).to_json()
    t2 = time.perf_counter()
    first = {"read": t1 - t0, "chart": t2 - t1, "total": t2 - t0, "rows": z.size}
    writer = FastWriter(run_dir, tags)
    writer.path = os.path.join(run_dir, sorted(p for p in os.listdir(run_dir)
                                               if p.startswith("events"))[-1])
    writer.write(range(cache.meta["rows"], cache.meta["rows"] + 10))
    cache.update()  # a live cache has learnt the layout already: warm it like the app's
    writer.write(range(cache.meta["rows"], cache.meta["rows"] + 10))
    t0 = time.perf_counter()
    new = cache.update()
    steps, z = cache.heatmap(METRIC, layers)
    charts.heatmap_figure(layers, steps, z, METRIC).to_json()
    refresh = time.perf_counter() - t0
    assert new == 10, new
    return {**first, "refresh": refresh, "rss": rss_mb()}


MEASURES = {"tidy": measure_tidy, "columnar_build": measure_columnar,
            "columnar_chart": measure_columnar_chart}


def in_subprocess(kind: str, run_dir: str, n_layers: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", kind, "--run-dir", run_dir,
                          "--layers", str(n_layers)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    if out.returncode:
        return {"error": (out.stderr or out.stdout)[-400:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--layers", type=int, default=300)
    parser.add_argument("--measure", choices=sorted(MEASURES))
    parser.add_argument("--run-dir")
    parser.add_argument("--skip-tidy", action="store_true",
                        help="skip today's reader (minutes and GBs at full size)")
    args = parser.parse_args()
    layers = layer_names(args.layers)
    tags = all_tags(layers)
    if args.measure:
        warm_up()
        print(json.dumps(MEASURES[args.measure](args.run_dir, layers, tags)))
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        run_dir = os.path.join(tmp, "7b")
        writer = FastWriter(run_dir, tags)
        t0 = time.perf_counter()
        writer.write(range(args.steps))
        write_s = time.perf_counter() - t0
        check_against_protobuf(writer.path, tags)
        size_gb = os.path.getsize(writer.path) / 1e9
        with open(writer.path, "rb") as fh:  # into the page cache, as for a run just written
            while fh.read(64 << 20):
                pass
        results = {}
        if not args.skip_tidy:
            results["tidy"] = in_subprocess("tidy", run_dir, args.layers)
        results["columnar_build"] = in_subprocess("columnar_build", run_dir, args.layers)
        results["columnar_chart"] = in_subprocess("columnar_chart", run_dir, args.layers)
    report(args, results, write_s, size_gb, len(tags))


def report(args, results: dict, write_s: float, size_gb: float, n_tags: int) -> None:
    from benchmarks.common import md_table, write_results

    def f(d: dict, key: str, fmt: str = "{:.2f}") -> str:
        return fmt.format(d[key]) if key in d else d.get("error", "-")[:200]

    tidy = results.get("tidy", {"error": "skipped (--skip-tidy)"})
    build, col = results["columnar_build"], results["columnar_chart"]
    rows = [
        ["today's reader: read all events", f(tidy, "read"), ""],
        ["today's reader: tidy table", f(tidy, "table"), f(tidy, "rows", "{:,} rows")],
        ["today's reader: heatmap transform + figure + JSON", f(tidy, "chart"), ""],
        ["**today's reader: first chart**", f(tidy, "total"), "target <= 3 s"],
        ["**today's reader: refresh (+10 steps)**", f(tidy, "refresh"), "target <= 0.3 s"],
        ["**today's reader: peak RSS (MB)**", f(tidy, "rss", "{:.0f}"), "target <= 2048"],
        ["columnar cache: build once from the events", f(build, "build"),
         f"peak RSS {f(build, 'rss_build', '{:.0f}')} MB; once per run, then extended"],
        ["columnar cache: read one metric's file, bin to the heatmap", f(col, "read"),
         f(col, "rows", "{:,} cells after binning")],
        ["columnar cache: figure + JSON", f(col, "chart"), ""],
        ["**columnar cache: first chart**", f(col, "total"), "target <= 3 s"],
        ["**columnar cache: refresh (+10 steps: read, append, redraw)**", f(col, "refresh"),
         "target <= 0.3 s"],
        ["**columnar cache: peak RSS (MB)**", f(col, "rss", "{:.0f}"), "target <= 2048"],
    ]
    body = (f"Run: {args.layers} tensors x {len(schema.METRIC_KEYS)} metrics x {args.steps:,} "
            f"logged steps = {args.layers * len(schema.METRIC_KEYS) * args.steps:,} per-layer "
            f"scalars ({n_tags:,} values per step event), one event file of {size_gb:.2f} GB "
            f"written in {write_s:.0f} s. Each row group ran in a fresh process (its own peak "
            "RSS); the event file was in the page cache; the machine is shared and noisy "
            f"(load average {os.getloadavg()[0]:.0f} on {os.cpu_count()} cores at the end of "
            "this run).\n\n"
            + md_table(["what", "seconds", "note"], rows) + DESIGN)
    write_results(RESULTS, "Dashboard on a 7B-class run", body)


DESIGN = """
**Reading.** Today's reader keeps every value as a tidy row (32 bytes in its chunks, about
30 more in the table it builds): at 27M rows that is minutes and more than 2 GB, so it
misses all three targets; TensorBoard's `EventAccumulator` is slower still (16 s for 1M
scalars in `dashboard.md`). The columnar cache stores 4 bytes per value, one file per
metric (12 MB per metric here, 110 MB for the run): a chart reads one file and bins it
straight into the heatmap (`charts.bin_columns`), a refresh decodes only the new events
(the same `dashboard.wire` fast path) and appends them.

**Not yet in the app.** The cache is a prototype in this script; wiring it in means: the
`RunReader` keeps one dense `step x tag` block per step layout instead of tidy chunks,
builds tidy tables per metric on demand (the charts' input), and persists the blocks under
the user's cache directory (the app writes nothing but `control.json` into run
directories), keyed by event file and byte offset. The one-time build reads the events
once, in bounded chunks.
"""


if __name__ == "__main__":
    main()
