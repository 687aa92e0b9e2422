"""The PSS detector's per-step input on disk, and its replay: the job's interventions exactly."""

from __future__ import annotations

import os

import torch
from torch import nn

import monitor
from monitor import schema
from monitor.pss import inputs
from monitor.schema import PSSConfig


def train(logdir, steps, pss, spikes=(), every=10, start_step=0, control_at=None, seed=0):
    """A small MLP with a few injected gradient spikes; returns the monitor."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    with monitor.watch(model, opt, logdir, every=every, preset="cheap", pss=pss,
                       start_step=start_step) as mon:
        for step in range(start_step, start_step + steps):
            factor = dict(spikes).get(step, 1.0)  # a gradient spike, made in the backward pass
            (nn.functional.mse_loss(model(x), y) * factor).backward()
            if control_at and step == control_at[0]:
                schema.write_control(logdir, control_at[1])
            opt.step()
            opt.zero_grad()
    return mon


def test_replay_reproduces_the_jobs_interventions_on_unlogged_steps(tmp_path):
    config = PSSConfig(warmup_steps=5, method="clip")
    # spikes between logged steps (every 10): a logged-steps-only replay misses them
    mon = train(str(tmp_path), 80, config, spikes=[(23, 4.0), (47, 8.0), (48, 8.0)])
    job = mon.pss.interventions
    assert job and all(s % 10 for s in job), job
    segments = inputs.read_inputs(str(tmp_path))
    steps, _, _, hits = inputs.replay(segments)
    assert len(steps) == 80 and steps == list(range(80))
    assert [s for s, h in zip(steps, hits) if h] == job
    same = inputs.replay(segments, config.tau, config.alpha, config.warmup_steps)
    assert [s for s, h in zip(same[0], same[3]) if h] == job
    lower = inputs.replay(segments, tau=1.5)
    assert set(job) <= {s for s, h in zip(lower[0], lower[3]) if h}


def test_replay_follows_settings_changed_from_the_control_file(tmp_path):
    config = PSSConfig(warmup_steps=5, method="clip")
    mon = train(str(tmp_path), 60, config, spikes=[(20, 3.0), (45, 3.0)],
                control_at=(30, config.replace(tau=3.5)))
    assert mon.pss.config.tau == 3.5
    job = mon.pss.interventions
    assert job == [20], job  # 45 would trigger with tau 2.5, not with 3.5
    segments = inputs.read_inputs(str(tmp_path))
    steps, _, _, hits = inputs.replay(segments)
    assert [s for s, h in zip(steps, hits) if h] == job
    steps, _, _, hits = inputs.replay(segments, tau=2.5)
    assert [s for s, h in zip(steps, hits) if h] == [20, 45]


def test_a_resumed_job_starts_a_new_segment_and_a_torn_tail_is_ignored(tmp_path):
    config = PSSConfig(warmup_steps=5, method="clip")
    first = train(str(tmp_path), 30, config, spikes=[(12, 5.0)])
    second = train(str(tmp_path), 30, config, spikes=[(33, 5.0), (52, 5.0)], start_step=30)
    path = os.path.join(str(tmp_path), schema.PSS_INPUT_FILENAME)
    with open(path, "ab") as fh:
        fh.write(b"\x01\x02\x03")  # a job killed mid-write
    segments = inputs.read_inputs(str(tmp_path))
    assert [s.start_step for s in segments] == [0, 30]
    steps, _, _, hits = inputs.replay(segments)
    # the resumed detector warms up again: step 33 is inside its warm-up
    assert [s for s, h in zip(steps, hits) if h] == first.pss.interventions + second.pss.interventions
    assert second.pss.interventions == [52]


def test_no_file_means_none_and_parse_of_empty_is_empty(tmp_path):
    assert inputs.read_inputs(str(tmp_path)) is None
    assert inputs.parse(b"") == []


def test_a_control_file_adopted_at_start_sets_the_first_segments_settings(tmp_path):
    schema.write_control(str(tmp_path), PSSConfig(warmup_steps=5, method="clip", tau=4.0))
    mon = train(str(tmp_path), 40, PSSConfig(warmup_steps=5, method="clip"),
                spikes=[(20, 3.0), (30, 6.0)])
    assert mon.pss.config.tau == 4.0 and mon.pss.interventions == [30]
    segments = inputs.read_inputs(str(tmp_path))
    assert segments[0].settings[0][:2] == (0, 4.0)
    steps, _, _, hits = inputs.replay(segments)
    assert [s for s, h in zip(steps, hits) if h] == [30]


def test_a_fifo_in_place_of_the_file_blocks_neither_the_job_nor_the_reader(tmp_path):
    os.mkfifo(tmp_path / schema.PSS_INPUT_FILENAME)
    log = inputs.InputLog(str(tmp_path), 0, 2.5, 0.1, 0)  # refused, a warning, no block
    log.append(0, 1.0)
    assert inputs.read_inputs(str(tmp_path)) is None
