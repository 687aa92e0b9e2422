"""Train a small character-level GPT on the Python standard library's source, monitored.

    python demos/train_chargpt.py                      # defaults below
    python demos/train_chargpt.py --steps 300 --pss    # with Parametric Singularity Smoothing
    python demos/train_chargpt.py --lr 3e-2            # a learning rate that spikes
    python demos/train_chargpt.py --spike-at 300       # an LR jump at step 300: an alert fires

Writes a run directory under --logdir (default runs/) and prints how to view it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass, fields

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import monitor  # noqa: E402
from demos.data import encode, get_batch, stdlib_text  # noqa: E402
from demos.model import GPT, GPTConfig  # noqa: E402


@dataclass
class TrainConfig:
    logdir: str = "runs"  # parent directory of run directories
    run_name: str = ""  # default: chargpt-<date-time>
    steps: int = 300  # optimizer steps (about 3 min on 2 cores; PSS acts at step 236)
    batch_size: int = 16
    block_size: int = 128
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 50  # linear LR warm-up steps
    grad_clip: float = 0.0  # 0: no clipping
    every: int = 10  # monitor logging interval (optimizer steps)
    preset: str = "default"  # monitor preset: cheap, default, full
    pss: bool = False  # enable Parametric Singularity Smoothing
    seed: int = 1337
    threads: int = 0  # torch threads; 0 keeps torch's default
    step_delay: float = 0.0  # seconds to sleep per step (slows the demo to watch it live)
    alerts: bool = False  # alert rules in the job (monitor.alerts defaults) + flight recorder
    spike_at: int = 0  # push the run into a loss spike: LR x100 for 5 steps from this step
    #                    (0: off; turns alerts on)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in fields(TrainConfig):
        if f.type == "bool":
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, action="store_true")
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind,
                                default=f.default)
    return TrainConfig(**vars(parser.parse_args(argv)))


def lr_factor(cfg: TrainConfig, t: int) -> float:
    """Linear warm-up; with --spike-at, x100 for 5 steps there (an LR jump: a loss spike)."""
    factor = min(1.0, (t + 1) / cfg.warmup) if cfg.warmup else 1.0
    return factor * (100.0 if cfg.spike_at and cfg.spike_at <= t < cfg.spike_at + 5 else 1.0)


def on_alert(alert) -> None:
    """What a job would do on an alert (save a checkpoint, lower the LR); here: say it."""
    tqdm.write(f"on_alert: {alert.describe()} (a job could checkpoint or lower its LR here)")


def main(cfg: TrainConfig) -> str:
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = encode(stdlib_text())
    model = GPT(GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                          n_embd=cfg.n_embd))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: lr_factor(cfg, t))
    run = cfg.run_name or time.strftime("chargpt-%Y%m%d-%H%M%S")
    logdir = os.path.join(cfg.logdir, run)
    gen = torch.Generator().manual_seed(cfg.seed)

    # the context manager closes the run (events flushed, run.json "finished") on Ctrl-C too
    alerts = cfg.alerts or cfg.spike_at > 0
    with monitor.watch(model, optimizer, logdir, every=cfg.every, preset=cfg.preset,
                       pss=cfg.pss or None, alerts=alerts or None,
                       on_alert=on_alert if alerts else None) as mon:
        mon.log_at(0, **{monitor.schema.TAG_TOTAL_STEPS: cfg.steps})  # the dashboard's ETA
        bar = tqdm(range(cfg.steps), desc=run, unit="step")
        for _ in bar:
            x, y = get_batch(data, cfg.batch_size, cfg.block_size, gen)  # (B, T), (B, T)
            _, loss = model(x, y)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            mon.log(loss=loss)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if cfg.step_delay:
                time.sleep(cfg.step_delay)
    print(f"\nrun written to {logdir}\n"
          f"  view in TensorBoard:  tensorboard --logdir {cfg.logdir}\n"
          f"  view in the dashboard: streamlit run dashboard/app.py -- --logdir {cfg.logdir}")
    return logdir


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # terminate = Ctrl-C: close the run
    main(parse_args())
