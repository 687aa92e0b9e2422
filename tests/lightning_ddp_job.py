"""A Lightning ``strategy="ddp"`` job on 2 CPU processes with the StabilityMonitor callback
(run by tests/test_distributed.py on 2 forked ranks; ``python tests/lightning_ddp_job.py DIR``
runs it with Lightning's own launcher, which starts rank 1 by running this file again).

Rank 0 asks for smoothing through control.json at step 1 (as the dashboard does); the job
smooths at its next poll, on both ranks. Each rank saves its weights and what it saw."""

from __future__ import annotations

import json
import os
import sys

import lightning.pytorch as pl
import torch

from monitor import schema
from monitor.integrations.lightning import StabilityMonitor
from monitor.schema import PSSConfig
from tests.test_integrations import regressor

STEPS = 7


class AskForSmoothing(pl.Callback):
    def __init__(self, logdir: str) -> None:
        self.logdir = logdir

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == 0 and trainer.global_step == 2:
            settings = schema.read_control(self.logdir).settings
            schema.write_control(self.logdir, settings, smooth_now=True)


def main(logdir: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 5), torch.randn(64, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    watcher = StabilityMonitor(logdir, every=1, preset="full", pss=PSSConfig(k_min=2))
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=2, strategy="ddp",
                         logger=False, callbacks=[watcher, AskForSmoothing(logdir)],
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    model = regressor()
    trainer.fit(model, loader)
    rank = trainer.global_rank
    torch.save({n: p.detach().clone() for n, p in model.named_parameters()},
               os.path.join(logdir, f"weights-rank{rank}.pt"))
    with open(os.path.join(logdir, f"lit-rank{rank}.json"), "w") as fh:
        json.dump({"type": type(watcher.monitor).__name__, "step": watcher.monitor.step,
                   "interventions": watcher.monitor.pss.interventions}, fh)


if __name__ == "__main__":
    main(sys.argv[1])
