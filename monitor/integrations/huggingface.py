"""Hugging Face ``transformers.Trainer`` integration: ``Trainer(callbacks=[StabilityCallback()])``.

Imports transformers lazily (this module is only loaded when used), so the core package
installs and imports without it.

The Trainer builds its optimizer itself and steps it through accelerate's wrapper; the
callback attaches :func:`monitor.watch` to the underlying ``torch.optim`` optimizer when
training begins, so a *step* is an optimizer step (gradient accumulation included);
``train/grad_norm`` is the norm before the Trainer's ``max_grad_norm`` clipping (the value
the Trainer logs) and ``train/grad_norm_applied`` the clipped one (``monitor/preclip.py``).
The run's planned optimizer steps (``state.max_steps``) are logged once as
``config/total_steps``, so the dashboard shows a live run's ETA. The loss the Trainer logs (averaged over its ``logging_steps``) is recorded as
``train/loss``, its evaluation metrics as ``eval/<name>``, at the optimizer step they were
logged after.

The run directory defaults to a ``stability`` folder inside the Trainer's TensorBoard
directory when that is known (``args.logging_dir`` in transformers 4,
``$TENSORBOARD_LOGGING_DIR`` in 5), else ``<output_dir>/stability``: TensorBoard shows both
runs side by side, and the Trainer's own ``train/grad_norm`` (before clipping, at 1-based
steps) does not mix with ours.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import TrainerCallback

from monitor.integrations.callbacks import WatchSettings


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer inside accelerate's ``AcceleratedOptimizer`` (or itself)."""
    seen = 0
    while not type(optimizer).__module__.startswith("torch.") and hasattr(optimizer, "optimizer") \
            and seen < 4:
        optimizer, seen = optimizer.optimizer, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"StabilityCallback: the Trainer's optimizer {type(optimizer).__name__} "
                        "wraps no torch.optim.Optimizer")
    return optimizer


class StabilityCallback(WatchSettings, TrainerCallback):
    """Watches a ``transformers.Trainer``'s model and optimizer during ``train()``.

    Args:
        logdir: run directory; default: ``<the Trainer's TensorBoard directory>/stability`` when
            that directory is known, else ``<output_dir>/stability``.
        every, preset, config, pss: as for :func:`monitor.watch`.
    """

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise RuntimeError("StabilityCallback: the Trainer passed no model or optimizer to "
                               "on_train_begin")
        tensorboard_dir = getattr(args, "logging_dir", None) or os.environ.get("TENSORBOARD_LOGGING_DIR")
        logdir = self.logdir or os.path.join(tensorboard_dir or args.output_dir, "stability")
        # resumed from a checkpoint: the Trainer restored global_step before this call
        self._watch(model, unwrap_optimizer(optimizer), logdir, start_step=state.global_step)
        self._log_total_steps(state.max_steps, state.global_step)  # set before this call

    def on_log(self, args, state, control, logs=None, **kwargs):
        """The Trainer's training loss as ``train/loss``, its evaluation metrics as
        ``eval/<name>``, at the optimizer step they were logged after (counted from 0)."""
        if self.monitor is None or not logs or state.global_step <= 0:
            return
        values = {("loss" if key == "loss" else f"eval/{key[5:]}"): value
                  for key, value in logs.items()
                  if (key == "loss" or key.startswith("eval_")) and isinstance(value, (int, float))}
        if values:
            self.monitor.log_at(state.global_step - 1, **values)

    def on_train_end(self, args, state, control, **kwargs):
        self._close()
