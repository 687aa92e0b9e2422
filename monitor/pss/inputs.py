"""What the PSS detector saw, step by step: a compact sidecar file for an exact replay.

The job logs ``train/grad_norm`` only every ``every`` steps, but its detector's average
moves on *every* step, so a replay over logged values cannot reproduce the job's
triggers. The controller therefore appends, at every optimizer step, the value it fed the
detector to ``<run dir>/pss_input.bin`` (``schema.PSS_INPUT_FILENAME``), and the
dashboard replays :class:`monitor.pss.detect.Detector` over it.

Format: little-endian records of 16 bytes, ``int64 step | float64 value``:

- ``step >= 0``: the detector was fed ``value`` (the global gradient norm) at that step;
- ``step == START``: a controller started here (job start or resume): a fresh detector,
  whose warm-up counts the steps it sees; ``value`` is the job's start step;
- ``step == TAU / ALPHA / WARMUP``: the settings in force changed (control file) to
  ``value`` from the next record on (also written after each START).

Cost: one unbuffered ``write`` of 16 bytes per step (a few microseconds, measured in
``benchmarks/bench_pss_inputs.py``); 1.6 MB per 100,000 steps. A record is written whole
by one ``write`` call on an append-only file, so a crash loses at most the step in
flight; a torn tail (fewer than 16 bytes) is ignored by the reader. Standard library only
(the dashboard imports it without torch).
"""

from __future__ import annotations

import logging
import math
import os
import stat
import struct
from dataclasses import dataclass, field

from monitor import safe_io
from monitor.pss.detect import Detector
from monitor.schema import PSS_INPUT_FILENAME

log = logging.getLogger("monitor.pss")

RECORD = struct.Struct("<qd")  # step, value
START, TAU, ALPHA, WARMUP = -1, -2, -3, -4
MAX_BYTES = 1 << 30  # 67M steps; a bigger file is not this run's input: refused
_SETTING = {TAU: "tau", ALPHA: "alpha", WARMUP: "warmup_steps"}


class InputLog:
    """Appends the detector's input to ``<logdir>/pss_input.bin``; never raises."""

    def __init__(self, logdir: str, start_step: int, tau: float, alpha: float,
                 warmup_steps: int) -> None:
        self.path = os.path.join(logdir, PSS_INPUT_FILENAME)
        self._fd: int | None = None
        try:  # never blocks (a FIFO planted here is refused), one write() per record
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK
                         | getattr(os, "O_NOFOLLOW", 0), 0o644)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise OSError(f"{self.path} is not a regular file")
            self._fd = fd
        except OSError as err:
            log.warning("PSS: cannot open %s (%s); the dashboard's what-if will replay logged "
                        "steps only", self.path, err)
        self._write(RECORD.pack(START, float(start_step)) + self._settings(tau, alpha, warmup_steps))

    @staticmethod
    def _settings(tau: float, alpha: float, warmup_steps: int) -> bytes:
        return (RECORD.pack(TAU, float(tau)) + RECORD.pack(ALPHA, float(alpha))
                + RECORD.pack(WARMUP, float(warmup_steps)))

    def append(self, step: int, value: float) -> None:
        self._write(RECORD.pack(int(step), float(value)))

    def settings(self, tau: float, alpha: float, warmup_steps: int) -> None:
        self._write(self._settings(tau, alpha, warmup_steps))

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, data)
        except OSError as err:  # a full disk must not stop training
            log.warning("PSS: writing %s failed (%s); no more detector input is recorded",
                        self.path, err)
            self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()


@dataclass
class Segment:
    """The steps one controller saw (one per job start or resume), with its settings."""

    start_step: int
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    # (index into steps from which it holds, tau, alpha, warmup_steps)
    settings: list[tuple[int, float, float, int]] = field(default_factory=list)


def read_inputs(run_dir: str) -> list[Segment] | None:
    """The segments recorded in ``run_dir``; None when the run has no usable input file
    (absent, or not a regular file of at most MAX_BYTES: read without blocking)."""
    try:
        raw = safe_io.read_bytes(os.path.join(run_dir, PSS_INPUT_FILENAME), MAX_BYTES)
    except (OSError, safe_io.RefusedFile):
        return None
    return parse(raw)


def parse(raw: bytes) -> list[Segment]:
    """Segments of a byte string in the format above (a torn last record is ignored)."""
    segments: list[Segment] = []
    pending = {"tau": 2.5, "alpha": 0.1, "warmup_steps": 0}
    usable = len(raw) - len(raw) % RECORD.size
    for step, value in RECORD.iter_unpack(raw[:usable]):
        if step == START:
            segments.append(Segment(start_step=int(value)))
        elif step in _SETTING:
            pending[_SETTING[step]] = value
            if segments:
                seg = segments[-1]
                entry = (len(seg.steps), pending["tau"], pending["alpha"],
                         int(pending["warmup_steps"]))
                if seg.settings and seg.settings[-1][0] == len(seg.steps):
                    seg.settings[-1] = entry
                else:
                    seg.settings.append(entry)
        elif step >= 0:
            if not segments:  # a file whose head was lost: treat as one segment
                segments.append(Segment(start_step=step))
            segments[-1].steps.append(step)
            segments[-1].values.append(value)
    return segments


def replay(segments: list[Segment], tau: float | None = None, alpha: float | None = None,
           warmup_steps: int | None = None) -> tuple[list[int], list[float], list[float], list[bool]]:
    """``(steps, values, ratios, triggered)`` of :class:`Detector` over every recorded step.

    A fresh detector per segment, warming up over the steps it sees, as the job's did.
    Settings given here hold throughout (a what-if); those left None follow what the job
    had in force at each step (its recorded history), so ``replay(segments)`` reproduces
    the job's own triggers exactly.
    """
    steps: list[int] = []
    values: list[float] = []
    ratios: list[float] = []
    hits: list[bool] = []
    for seg in segments:
        detector = Detector(tau=2.5, alpha=0.1)
        changes = list(seg.settings)
        for i, (step, g) in enumerate(zip(seg.steps, seg.values)):
            while changes and changes[0][0] <= i:
                _, detector.tau, detector.alpha, detector.warmup_steps = changes.pop(0)
            if tau is not None:
                detector.tau = tau
            if alpha is not None:
                detector.alpha = alpha
            if warmup_steps is not None:
                detector.warmup_steps = warmup_steps
            hit, ratio = detector.update(g)
            steps.append(step)
            values.append(g)
            ratios.append(ratio if math.isfinite(ratio) else math.inf)
            hits.append(hit)
    return steps, values, ratios, hits
