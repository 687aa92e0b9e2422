"""What the framework callbacks (``lightning``, ``huggingface``) share."""

from __future__ import annotations

from monitor.config import MonitorConfig
from monitor.hook import Monitor, resolve_config, resolve_pss, watch
from monitor.schema import PSSConfig


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

    def _close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
