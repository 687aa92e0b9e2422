"""What the framework callbacks (``lightning``, ``huggingface``) share."""

from __future__ import annotations

import math

from monitor.config import MonitorConfig
from monitor.hook import Monitor, resolve_config, resolve_pss, watch
from monitor.schema import TAG_TOTAL_STEPS, PSSConfig


class WatchSettings:
    """The :func:`monitor.watch` arguments a callback holds until training starts; validated
    at construction, so a wrong argument fails at once and not at fit time."""

    def __init__(self, logdir: str | None = None, every: int | None = None, *,
                 preset: str = "default", config: MonitorConfig | None = None,
                 pss: PSSConfig | bool | None = None) -> None:
        config = resolve_config(every, preset, config, "WatchSettings")
        pss = resolve_pss(pss, "WatchSettings")
        self.logdir, self.config, self.pss, self.every = logdir, config, pss, every
        self.monitor: Monitor | None = None

    def _watch(self, model, optimizer, logdir: str, start_step: int) -> None:
        self._close()  # a second fit / train() call starts a fresh monitor
        self.monitor = watch(model, optimizer, logdir, every=self.every, config=self.config,
                             pss=self.pss, start_step=start_step)

    def _log_total_steps(self, total, step: int) -> None:
        """``config/total_steps``: the optimizer steps the framework plans for this run, so
        the dashboard shows a live run's ETA. Nothing when it does not know (an unbounded
        run: -1, inf, None)."""
        try:
            total = float(total)
        except (TypeError, ValueError):
            return
        if self.monitor is not None and math.isfinite(total) and total > 0:
            self.monitor.log_at(step, **{TAG_TOTAL_STEPS: total})

    def _close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
