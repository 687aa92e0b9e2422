"""The dashboard on the run of a 7B-class model: 300 tensors x 9 metrics x 10,000 logged
steps (27M scalars), against the targets first chart <= 3 s, refresh <= 0.3 s, RSS <= 2 GB.

    python benchmarks/bench_dashboard_7b.py            # writes benchmarks/results/dashboard_7b.md
    python benchmarks/bench_dashboard_7b.py --steps 1000   # a smaller honest version

Needs the ``bench`` extra (``crc32c``, a C CRC-32C: writing 1.4 GB of event files through
TensorBoard's pure-Python CRC would take most of an hour). The event file is written
directly in TFRecord framing, one event per step holding all 2,702 values, byte for byte
what ``EventWriter`` writes (checked: the first events are parsed back with the protobuf
decoder and compared). Values are lognormal around 1, SJE scaled into [0, 1] as real SJE is.

Measured through the app's own code (``benchmarks/dashboard_app.py``), each in a fresh
process (its own peak RSS): the Layers view's first chart path without Streamlit (read every
event into the columnar store, the stable-rank heatmap from the columns, figure JSON), and
the app in Streamlit's ``AppTest`` (time to the first chart, to the end of the page, and a
rerun after 10 more steps: a live refresh).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import dashboard_app  # noqa: E402
from dashboard import wire  # noqa: E402
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
    """Appends step events (all tags, one float32 each) to the run's event file."""

    def __init__(self, run_dir: str, tags: list[str]) -> None:
        os.makedirs(run_dir, exist_ok=True)
        existing = sorted(p for p in os.listdir(run_dir) if p.startswith("events.out"))
        name = existing[-1] if existing else f"events.out.tfevents.{int(time.time())}.bench.7b"
        self.path = os.path.join(run_dir, name)
        summary = Summary(value=scalar_values({t: 1.0 for t in tags})).SerializeToString()
        offsets = wire.float_offsets(summary, 0, len(summary))
        self.raw = np.frombuffer(summary, np.uint8).copy()
        self.gather = (np.asarray(offsets)[:, None] + np.arange(4)).ravel()
        self.rng = np.random.default_rng(0)
        self.n = len(tags)
        self.scale = np.array([0.3 if t.startswith(schema.SJE + "/") else 1.0 for t in tags])

    def write(self, steps: range) -> None:
        with open(self.path, "ab") as fh:
            for step in steps:
                values = (self.scale * self.rng.lognormal(0.0, 0.3, self.n)).astype("<f4")
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


def appender(run_dir: str, tags: list[str]):
    def append(last: int) -> None:
        FastWriter(run_dir, tags).write(range(last + 1, last + 11))
    return append


def measure(kind: str, run_dir: str, tags: list[str]) -> dict:
    append = appender(run_dir, tags)
    if kind == "chart":
        return dashboard_app.chart_path(run_dir, METRIC, append)
    view = "Overview" if kind == "app_overview" else "Layers"
    return dashboard_app.app_path(os.path.dirname(run_dir), view, append)


def in_subprocess(kind: str, run_dir: str, args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", kind, "--run-dir", run_dir,
                          "--layers", str(args.layers), "--steps", str(args.steps)],
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    if out.returncode:
        return {"error": (out.stderr or out.stdout)[-400:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--layers", type=int, default=300)
    parser.add_argument("--measure", choices=("chart", "app", "app_overview"))
    parser.add_argument("--run-dir")
    args = parser.parse_args()
    tags = all_tags(layer_names(args.layers))
    if args.measure:
        print(json.dumps(measure(args.measure, args.run_dir, tags)))
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
        before = uptime()
        results = {kind: in_subprocess(kind, run_dir, args)
                   for kind in ("chart", "app", "app_overview")}
        after = uptime()
    report(args, results, write_s, size_gb, len(tags), before, after)


def report(args, results: dict, write_s: float, size_gb: float, n_tags: int, before: str,
           after: str) -> None:
    from benchmarks.common import md_table, write_results

    def f(d: dict, key: str, fmt: str = "{:.2f}") -> str:
        return fmt.format(d[key]) if key in d else d.get("error", "-")[:300]

    chart, app, overview = results["chart"], results["app"], results["app_overview"]
    rows = [
        ["read every event into the columnar store", f(chart, "read"),
         f(chart, "values", "{:,} values")],
        ["stable-rank heatmap from the columns (300 x 10,000, binned)", f(chart, "heatmap"), ""],
        ["figure to JSON", f(chart, "json"), ""],
        ["**first chart (chart path)**", f(chart, "first"), "target <= 3 s"],
        ["refresh (+10 steps): read the new records", f(chart, "refresh_read"),
         f(chart, "new_events", "{} new events")],
        ["**refresh (chart path: read + heatmap + JSON)**", f(chart, "refresh"),
         "target <= 0.3 s"],
        ["**peak RSS, chart path (MB)**", f(chart, "rss", "{:.0f}"), "target <= 2048"],
        ["app (AppTest, Layers view, cold): first chart handed to the browser",
         f(app, "first_chart"), "target <= 3 s"],
        ["app: whole page (heatmap, alerts, lines)", f(app, "first_page"), ""],
        ["app: rerun after +10 steps, first chart", f(app, "refresh_chart"), "target <= 0.3 s"],
        ["app: rerun after +10 steps, whole page", f(app, "refresh_page"), ""],
        ["**peak RSS, app (MB)**", f(app, "rss", "{:.0f}"), "target <= 2048"],
        ["app, Overview view, cold: first chart (loss; the alerts above it come last) / whole page",
         f"{f(overview, 'first_chart')} / {f(overview, 'first_page')}", "target <= 3 s"],
        ["app, Overview: rerun after +10 steps, first chart / whole page",
         f"{f(overview, 'refresh_chart')} / {f(overview, 'refresh_page')}", "target <= 0.3 s"],
        ["peak RSS, app on the Overview (MB)", f(overview, "rss", "{:.0f}"), "target <= 2048"],
    ]
    body = (f"Run: {args.layers} tensors x {len(schema.METRIC_KEYS)} metrics x {args.steps:,} "
            f"logged steps = {args.layers * len(schema.METRIC_KEYS) * args.steps:,} per-layer "
            f"scalars ({n_tags:,} values per step event), one event file of {size_gb:.2f} GB "
            f"written in {write_s:.0f} s, in the page cache. Each row group ran in a fresh "
            f"process at nice 0 (its own peak RSS). Load: `{before}` before, `{after}` after.\n\n"
            + md_table(["what", "seconds", "note"], rows))
    write_results(RESULTS, "Dashboard on a 7B-class run", body)


if __name__ == "__main__":
    main()
