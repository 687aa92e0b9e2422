"""Columnar storage of a run's scalars: one dense ``rows x tags`` block per tag layout.

The monitor writes one event per logged step holding every tag in the same order, so a run's
scalars are a ``steps x tags`` matrix. :class:`ColumnStore` keeps one :class:`Block` per
distinct layout (an event's tag codes, in order): per row the step, wall time, file index and
event number, and the values as float32 (what ``Summary.Value.simple_value`` holds, so no
precision is lost). Rows live in chunks of fixed size: appending N events costs O(N) and never
copies what is stored (4 bytes per value: a 27M-scalar run takes 110 MB, where a tidy row
costs about 60). Events of other layouts (a PSS event now and then, a first step with
configuration tags) make their own small blocks.

Tidy tables (``dashboard.data.COLUMNS``) are built on demand, only for the tags a chart
draws (:meth:`ColumnStore.rows`). Non-finite values are noted as they arrive
(:meth:`ColumnStore.nonfinite_rows`), so the alerts find them without reading every metric.
"""

from __future__ import annotations

import numpy as np

CHUNK_BYTES = 4 << 20  # values per chunk at most: 4 MB (about 390 steps of a 2,700-tag event)
FIRST_ROWS = 16  # rows of a layout's first chunk; chunks double up to CHUNK_BYTES, so a
#                  layout seen once (or a hostile file of thousands) costs bytes, not MBs
MAX_LAYOUT_IDS = 256  # template code arrays remembered for the fast block lookup
_EMPTY_I64 = np.empty(0, np.int64)


class Block:
    """Rows of events with one tag layout (``codes``), stored in chunks that are never
    copied once written: appending costs O(new rows)."""

    _META = np.dtype([("step", np.int64), ("wall", np.float64), ("file", np.int32),
                      ("seq", np.int64)])

    def __init__(self, codes: np.ndarray) -> None:
        self.codes = np.asarray(codes, np.int32)
        width = max(1, len(self.codes))
        self.max_rows = int(np.clip(CHUNK_BYTES // (4 * width), FIRST_ROWS, 4096))
        self.n = 0
        self._fill = 0  # rows used in the last chunk
        self._values: list[np.ndarray] = []  # (chunk rows, width) float32
        self._meta: list[np.ndarray] = []  # (chunk rows,) records: step, wall, file, seq

    def add(self, step: int, wall: float, file: int, seq: int, values) -> None:
        if not self._meta or self._fill == len(self._meta[-1]):
            rows = min(self.max_rows, FIRST_ROWS << len(self._meta))
            self._values.append(np.empty((rows, len(self.codes)), np.float32))
            self._meta.append(np.empty(rows, self._META))
            self._fill = 0
        self._values[-1][self._fill] = values
        self._meta[-1][self._fill] = (step, wall, file, seq)
        self._fill += 1
        self.n += 1

    def meta(self) -> np.ndarray:
        """The rows' (step, wall, file, seq) records, in arrival order."""
        return self._joined(self._meta)

    def columns(self, cols: np.ndarray) -> np.ndarray:
        """``(rows, len(cols))`` float32 of the given column positions."""
        if len(cols) and np.array_equal(cols, np.arange(cols[0], cols[0] + len(cols))):
            pick = slice(int(cols[0]), int(cols[0]) + len(cols))  # a view per chunk: faster
            return self._joined([chunk[:, pick] for chunk in self._values])
        return self._joined([chunk[:, cols] for chunk in self._values])

    def _joined(self, chunks: list[np.ndarray]) -> np.ndarray:
        """The filled rows of the chunks, as one array."""
        last = chunks[-1][:self._fill]
        return last if len(chunks) == 1 else np.concatenate(chunks[:-1] + [last])


class ColumnStore:
    """A run's scalars: tag names with codes, blocks by layout, restarts, non-finite rows."""

    def __init__(self) -> None:
        self.tags: list[str] = []
        self._code: dict[str, int] = {}
        self.blocks: list[Block] = []
        self._by_layout: dict[bytes, Block] = {}
        self._by_id: dict[int, tuple[np.ndarray, Block]] = {}  # codes array -> block, fast
        self.restarts: list[tuple[int, int]] = []  # (file index, step) of SessionLog.START
        self._bad: list[tuple] = []  # (step, wall, code, value, file, seq) non-finite values
        self.events = 0  # events stored (their row's ``seq``)
        self.values = 0  # scalars stored

    def code(self, tag: str) -> int:
        found = self._code.get(tag)
        if found is None:
            found = self._code[tag] = len(self.tags)
            self.tags.append(tag)
        return found

    def add(self, step: int, wall: float, file: int, codes: np.ndarray, values) -> None:
        """One event's scalars: ``values[i]`` is the value of tag code ``codes[i]``."""
        block = self._block(codes)
        values = np.asarray(values, np.float32)
        block.add(step, wall, file, self.events, values)
        finite = np.isfinite(values)
        if not finite.all():
            for i in np.flatnonzero(~finite):
                self._bad.append((step, wall, int(block.codes[i]), float(values[i]), file,
                                  self.events))
        self.events += 1
        self.values += len(values)

    def _block(self, codes: np.ndarray) -> Block:
        known = self._by_id.get(id(codes))
        if known is not None and known[0] is codes:  # the same template's codes array
            return known[1]
        key = np.asarray(codes, np.int32).tobytes()
        block = self._by_layout.get(key)
        if block is None:
            block = self._by_layout[key] = Block(codes)
            self.blocks.append(block)
        if isinstance(codes, np.ndarray):
            if len(self._by_id) >= MAX_LAYOUT_IDS:  # templates come and go: stay bounded
                self._by_id.clear()
            self._by_id[id(codes)] = (codes, block)  # holds codes: its id stays unique
        return block

    def rows(self, codes: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """``(step, wall, code, value)`` of every stored value of tag ``codes`` (all tags
        when None), in arrival order, with what a restart superseded dropped."""
        parts = []
        for block in self.blocks:
            cols = (np.arange(len(block.codes)) if codes is None
                    else np.flatnonzero(np.isin(block.codes, codes)))
            if not block.n or not len(cols):
                continue
            meta, values = block.meta(), block.columns(cols)  # values: (rows, k), row-major
            if self.restarts:
                keep = superseded_mask(meta["step"], meta["file"], self.restarts)
                meta, values = meta[keep], values[keep]
            k = len(cols)
            parts.append((np.repeat(meta["seq"], k) if len(self.blocks) > 1 else None,
                          np.repeat(meta["step"], k), np.repeat(meta["wall"], k),
                          np.tile(block.codes[cols], len(meta)), values.ravel()))
        return _in_order(parts)

    def nonfinite_rows(self) -> tuple[np.ndarray, ...]:
        """``(step, wall, code, value)`` of the NaN and infinite values, in arrival order."""
        bad = self._bad
        if not bad:
            return _in_order([])
        step, wall, code, value, file, seq = (np.asarray(c) for c in zip(*bad))
        keep = superseded_mask(step, file, self.restarts)
        return _in_order([(None, step[keep].astype(np.int64), wall[keep].astype(np.float64),
                           code[keep].astype(np.int32), value[keep].astype(np.float32))])

    def matrix(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, Z)``: ``Z[i, j]`` the value of tag ``codes[i]`` at ``steps[j]`` (NaN:
        none; -1 codes are rows of NaN). Read straight from the block's columns when one
        block holds them all (the monitor's layout); else from the tidy rows, where a step
        logged twice shows its later value."""
        holders = [b for b in self.blocks if b.n and np.isin(b.codes, codes).any()]
        if len(holders) != 1:
            step, _, code, value = self.rows(codes[codes >= 0])
            return _scatter(codes, step, code, value)
        block = holders[0]
        meta = block.meta()
        pos = {int(c): j for j, c in enumerate(block.codes)}  # a repeated tag: its last column
        found = np.array([pos.get(int(c), -1) for c in codes], np.int64)
        values = block.columns(found[found >= 0])  # (rows, found)
        steps = meta["step"]
        if self.restarts:
            keep = superseded_mask(steps, meta["file"], self.restarts)
            steps, values = steps[keep], values[keep]
        if len(steps) > 1 and not (np.diff(steps) > 0).all():  # out of order or repeated
            rows = np.repeat(steps, values.shape[1])
            code = np.tile(codes[found >= 0], len(steps))
            return _scatter(codes, rows, code, values.ravel().astype(np.float64))
        z = np.full((len(codes), len(steps)), np.nan)
        z[found >= 0] = values.T
        return steps, z

    def step_times(self) -> tuple[np.ndarray, np.ndarray]:
        """Each step that logged a value once (sorted), with the wall time it was first
        logged at."""
        metas = [b.meta() for b in self.blocks if b.n]
        if not metas:
            return _EMPTY_I64, np.empty(0)
        meta = np.concatenate(metas)
        if self.restarts:
            meta = meta[superseded_mask(meta["step"], meta["file"], self.restarts)]
        meta = meta[np.argsort(meta["seq"], kind="stable")]
        steps, first = np.unique(meta["step"], return_index=True)
        return steps, meta["wall"][first]

    def present(self) -> np.ndarray:
        """Tag codes with at least one stored value."""
        codes = [b.codes for b in self.blocks if b.n]
        return np.unique(np.concatenate(codes)) if codes else np.empty(0, np.int32)


def _in_order(parts: list[tuple]) -> tuple[np.ndarray, ...]:
    """``(step, wall, code, value)`` of ``(seq, step, wall, code, value)`` parts, merged back
    into the order the events arrived in (``seq``) when there are several."""
    if not parts:
        return (_EMPTY_I64, np.empty(0), np.empty(0, np.int32), np.empty(0))
    if len(parts) == 1:
        _, step, wall, code, value = parts[0]
    else:
        seq, step, wall, code, value = (np.concatenate(c) for c in zip(*parts))
        order = np.argsort(seq, kind="stable")
        step, wall, code, value = step[order], wall[order], code[order], value[order]
    return step, wall, code, value.astype(np.float64)


def _scatter(codes, step, code, value) -> tuple[np.ndarray, np.ndarray]:
    """The (steps, Z) of :meth:`ColumnStore.matrix` from tidy rows (later rows win)."""
    steps = np.unique(step)
    row_of = np.full(max(int(codes.max(initial=-1)), int(code.max(initial=-1))) + 2, -1)
    row_of[codes[codes >= 0]] = np.flatnonzero(codes >= 0)
    r = row_of[code]
    z = np.full((len(codes), len(steps)), np.nan)
    keep = r >= 0
    z[r[keep], np.searchsorted(steps, step[keep])] = value[keep]
    return steps, z


def superseded_mask(step: np.ndarray, file: np.ndarray, restarts: list[tuple[int, int]]
                    ) -> np.ndarray:
    """Rows to keep, TensorBoard's restart rule: a ``SessionLog.START`` at step T in event
    file f (a job resumed from a checkpoint; ``EventWriter.write_session_start``) drops what
    the earlier files of the run logged at step T or later, so the steps a crashed job logged
    past its last checkpoint are replaced, not doubled. ``restarts``: (file index, T) pairs."""
    keep = np.ones(len(step), bool)
    for f, start in restarts:
        keep &= ~((file < f) & (step >= start))
    return keep
