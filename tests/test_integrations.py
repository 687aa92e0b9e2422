"""Real Lightning and Hugging Face Trainer objects: the callbacks watch their training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from monitor import schema
from tests.helpers import all_finite, read_scalars


def regressor():
    import lightning.pytorch as pl

    class Regressor(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    return Regressor()


def test_lightning_callback_logs_every_layer(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from monitor.integrations.lightning import StabilityMonitor

    data = torch.utils.data.TensorDataset(torch.randn(32, 5), torch.randn(32, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    logger = TensorBoardLogger(str(tmp_path), name="lit", version=0)
    callback = StabilityMonitor(every=1, preset="full")
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=logger, callbacks=[callback],
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(regressor(), loader)
    logged = read_scalars(logger.log_dir)
    assert sorted(logged[schema.TAG_LOSS]) == [0, 1, 2, 3]
    for metric in ("stable_rank", "sje", "ntk_eig", "grad_norm", "lr", "lr_effective"):
        series = logged[f"{metric}/net.0.weight"]
        assert sorted(series) == [0, 1, 2, 3] and all_finite(series), metric
    assert callback.monitor is not None and callback.monitor.step == 4
    assert logged[schema.TAG_TOTAL_STEPS] == {0: 4.0}  # the dashboard's ETA


def test_lightning_logs_the_planned_steps_of_an_epoch_bounded_fit(tmp_path):
    """No max_steps: 2 epochs x 4 batches, accumulating 2 batches = 4 optimizer steps."""
    import lightning.pytorch as pl

    from dashboard.data import RunReader
    from monitor.integrations.lightning import StabilityMonitor

    data = torch.utils.data.TensorDataset(torch.randn(32, 5), torch.randn(32, 1))
    callback = StabilityMonitor(str(tmp_path / "run"), every=2, preset="cheap")
    pl.Trainer(max_epochs=2, accumulate_grad_batches=2, accelerator="cpu", logger=False,
               callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False).fit(
        regressor(), torch.utils.data.DataLoader(data, batch_size=8))
    assert callback.monitor.step == 4
    reader = RunReader(str(tmp_path / "run"))
    reader.refresh()
    table = reader.table([schema.TAG_TOTAL_STEPS])  # what the Overview reads for the ETA
    assert list(table["step"]) == [0] and list(table["value"]) == [4.0]


def test_hugging_face_trainer_callback_with_gradient_accumulation(tmp_path, monkeypatch):
    """A real transformers.Trainer (accelerate inside) on a tiny GPT-2 from a config."""
    from transformers import Trainer, TrainingArguments

    from monitor.integrations.huggingface import StabilityCallback
    from tests.helpers import tiny_gpt2

    torch.manual_seed(0)
    model = tiny_gpt2()
    ids = torch.randint(0, 64, (32, 16))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    # where the Trainer's TensorBoard callback writes (transformers 5; 4 had args.logging_dir)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "logs"))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=1,
                             eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=8,
                             report_to=["tensorboard"], save_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    callback = StabilityCallback(every=1, preset="full")
    Trainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset[:8],
            callbacks=[callback]).train()
    assert callback.monitor is not None and callback.monitor.step == 4  # optimizer steps
    theirs = read_scalars(str(tmp_path / "logs"))  # the Trainer's own TensorBoard run
    logged = read_scalars(str(tmp_path / "logs" / "stability"))
    assert logged[schema.TAG_TOTAL_STEPS] == {0: 4.0}  # state.max_steps: the dashboard's ETA
    # the Trainer's loss, at the 0-based optimizer step it was logged after
    assert sorted(logged["train/loss"]) == [0, 1, 2, 3]
    for t in range(4):
        assert logged["train/loss"][t] == pytest.approx(theirs["train/loss"][t + 1])
    assert sorted(logged["eval/loss"]) == [1, 3]  # evaluated after optimizer steps 2 and 4
    assert logged["eval/loss"][3] == pytest.approx(theirs["eval/loss"][4])
    # the norm before the Trainer's clipping (max_grad_norm=1), as the Trainer logs it, and
    # the one applied under its own tag where clipping acted
    for t in range(4):
        before = theirs["train/grad_norm"][t + 1]
        assert logged[schema.TAG_GLOBAL_GRAD_NORM][t] == pytest.approx(before, rel=1e-3)
        applied = logged.get(schema.TAG_GLOBAL_GRAD_NORM_APPLIED, {}).get(t, before)
        assert applied == pytest.approx(min(before, 1.0), rel=1e-3)
    # GPT-2's Conv1D (transposed weights) and the tied embedding / LM head, every metric
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.wte.weight"):
        for metric in ("stable_rank", "sje", "grad_norm", "lr", "lr_effective", "update_ratio"):
            series = logged[f"{metric}/{name}"]
            assert sorted(series) == [0, 1, 2, 3] and all_finite(series), (metric, name)
    assert sorted(logged["ntk_eig/transformer.h.0.mlp.c_fc.weight"]) == [0, 1, 2, 3]
    # the learning rate the scheduler set at each step (linear decay from 1e-3 over 4 steps)
    lrs = logged["lr/transformer.h.0.attn.c_attn.weight"]
    assert lrs[0] == pytest.approx(1e-3) and lrs[3] == pytest.approx(2.5e-4)


def test_hugging_face_resume_from_checkpoint_continues_the_steps(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import Trainer, TrainingArguments

    from monitor.integrations.huggingface import StabilityCallback
    from tests.helpers import tiny_gpt2

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "logs"))
    ids = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": row} for row in ids]

    def trainer(callback):
        torch.manual_seed(0)
        args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4,
                                 per_device_train_batch_size=4, learning_rate=1e-3,
                                 logging_steps=1, report_to=[], save_strategy="steps",
                                 save_steps=2, use_cpu=True, disable_tqdm=True)
        return Trainer(model=tiny_gpt2(), args=args, train_dataset=dataset, callbacks=[callback])

    trainer(StabilityCallback(every=1, preset="cheap")).train()
    _sleep_past_a_second()  # a new event file name sorts after the first one
    again = StabilityCallback(every=1, preset="cheap")
    trainer(again).train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert again.monitor.step == 4
    acc = EventAccumulator(str(tmp_path / "logs" / "stability"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("grad_norm/transformer.h.0.attn.c_attn.weight")] == [0, 1, 2, 3]
    assert [e.step for e in acc.Scalars(schema.TAG_LOSS)] == [0, 1, 2, 3]


def _sleep_past_a_second():
    import time

    time.sleep(1.05)


def test_lightning_resume_from_checkpoint_continues_the_steps(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from monitor.integrations.lightning import StabilityMonitor

    data = torch.utils.data.TensorDataset(torch.randn(48, 5), torch.randn(48, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=8)

    def fit(ckpt_path=None):
        callback = StabilityMonitor(every=1, preset="cheap")
        trainer = pl.Trainer(
            max_steps=5, accelerator="cpu", logger=TensorBoardLogger(str(tmp_path), name="lit", version=0),
            callbacks=[callback, ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2,
                                                 save_top_k=-1)],
            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(regressor(), loader, ckpt_path=ckpt_path)
        return callback, trainer

    fit()
    _sleep_past_a_second()
    [ckpt] = [p for p in (tmp_path / "ckpt").iterdir() if "step=2" in p.name]
    callback, trainer = fit(str(ckpt))
    assert callback.monitor.step == trainer.global_step == 5
    acc = EventAccumulator(str(tmp_path / "lit" / "version_0"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("grad_norm/net.0.weight")] == [0, 1, 2, 3, 4]
