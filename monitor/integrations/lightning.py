"""Lightning integration: ``Trainer(callbacks=[StabilityMonitor()])``.

Imports Lightning lazily (this module is only loaded when used), so the core package
installs and imports without it. The fit's planned optimizer steps
(``trainer.estimated_stepping_batches``: ``max_steps``, or epochs x batches over gradient
accumulation) are logged once as ``config/total_steps``, so the dashboard shows the ETA.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from monitor.integrations.callbacks import WatchSettings


class StabilityMonitor(WatchSettings, Callback):
    """Watches the first optimizer of a Lightning fit and logs the step loss.

    Args:
        logdir: run directory; default: the trainer logger's ``log_dir`` (so the metrics
            open in TensorBoard beside Lightning's own), else ``<default_root_dir>/stability``.
        every, preset, config, pss: as for :func:`monitor.watch`.
    """

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # not on_fit_start: Lightning restores a checkpoint's global_step between the two
        if not trainer.optimizers:
            raise RuntimeError("StabilityMonitor: the LightningModule configured no optimizer")
        logdir = self.logdir or getattr(trainer.logger, "log_dir", None) or os.path.join(
            trainer.default_root_dir, "stability")
        self._watch(pl_module, trainer.optimizers[0], logdir, start_step=trainer.global_step)
        # optimizer steps of the whole fit (max_steps, or epochs x batches / accumulation);
        # inf for an unbounded fit: then nothing is logged
        self._log_total_steps(trainer.estimated_stepping_batches, trainer.global_step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self.monitor is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.monitor.log(loss=loss)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._close()
