"""The PSS trial's testbed (benchmarks/pss_testbed.py on benchmarks/spike_model.py): the
model's switches and the explosion rule of issue 11."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.pss_testbed import (FAULTS, RunSpec, Setup, block_matrices, explosion_step, failed,
                                    inject, make_model, stall_steps, train)
from benchmarks.spike_model import SpikeGPT, SpikeGPTConfig

CFG = dict(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=16)


def tokens(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(16, (3, 8), generator=gen)
    return x, torch.roll(x, -1, dims=1)


@pytest.mark.parametrize("post_ln", [False, True])
def test_both_block_orders_train_forward_and_backward(post_ln):
    torch.manual_seed(0)
    model = SpikeGPT(SpikeGPTConfig(post_ln=post_ln, **CFG))
    ce, loss = model(*tokens())
    ce = float(ce.detach())
    loss.backward()
    assert math.isfinite(ce) and ce == pytest.approx(math.log(16), abs=0.3)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # post-LN has no final LayerNorm (the last block's output is already normalised)
    assert isinstance(model.ln_f, torch.nn.Identity) == post_ln


def test_post_ln_normalises_after_the_residual_sum_and_pre_ln_does_not():
    torch.manual_seed(0)
    x = 5.0 + 3.0 * torch.randn(2, 8, 16)  # a residual stream far from mean 0, std 1
    post = SpikeGPT(SpikeGPTConfig(post_ln=True, **CFG)).blocks[0](x)
    pre = SpikeGPT(SpikeGPTConfig(post_ln=False, **CFG)).blocks[0](x)
    # LayerNorm at init (gain 1, shift 0): every token's features have mean 0 and std 1
    assert post.mean(-1).abs().max() < 1e-4
    assert post.var(-1, unbiased=False).sub(1).abs().max() < 1e-3
    assert pre.mean(-1).abs().min() > 1.0  # the stream passes through: still ~5


def test_qk_layernorm_bounds_the_attention_logits():
    """With LayerNorm on q and k (gain 1) |q.k| / sqrt(hs) <= sqrt(hs) (Cauchy-Schwarz);
    without it, scaling the qkv matrix by 100 scales the logits by 10^4."""
    hs = CFG["n_embd"] // CFG["n_head"]
    logits = {}
    for qk in (False, True):
        torch.manual_seed(0)
        model = SpikeGPT(SpikeGPTConfig(qk_norm=qk, **CFG))
        with torch.no_grad():
            for block in model.blocks:
                block.attn.qkv.weight.mul_(100.0)
        model(*tokens())
        logits[qk] = max(model.attention_logits().values())
    assert logits[True] <= math.sqrt(hs) + 1e-4
    assert logits[False] > 10 * math.sqrt(hs)


def test_make_model_follows_the_setup():
    s = Setup(n_layer=3, n_head=2, n_embd=24, block_size=16, post_ln=True)
    model = make_model(s, qk_norm=True)
    cfg = model.cfg
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.post_ln, cfg.qk_norm) == (
        3, 2, 24, 16, True, True)
    assert len(block_matrices(model)) == 3 * 4  # qkv, proj, fc, fc_proj per block


def plateau(n=300, seed=0):
    """A training loss: fast fall to 2.0, then per-batch noise (std 0.05)."""
    rng = np.random.default_rng(seed)
    return list(2.0 + 2.5 * np.exp(-np.arange(n) / 15) + 0.05 * rng.standard_normal(n))


def test_explosion_rule_on_synthetic_curves():
    assert explosion_step(plateau()) is None
    loss = plateau()
    loss[150:175] = [x + 1.5 for x in loss[150:175]]  # 25 steps above min + 1 nat
    assert explosion_step(loss) == 150
    loss = plateau()
    loss[150:165] = [x + 1.5 for x in loss[150:165]]  # 15 steps: a spike, no explosion
    assert explosion_step(loss) is None
    loss = plateau()
    loss[150:] = [x + 0.8 for x in loss[150:]]  # up to stay, but by less than 1 nat
    assert explosion_step(loss) is None
    loss = plateau()
    loss[150:160] = [x + 1.5 for x in loss[150:160]]
    loss[160] = math.nan  # non-finite during an excursion: the excursion's first step
    assert explosion_step(loss[:161]) == 150
    assert explosion_step(plateau()[:40] + [math.inf]) == 40


def test_stall_rule_counts_steps_at_the_unigram_plateau():
    """A post-LN run at too large an LR sits at the unigram loss: a stall of >= 100 steps
    after the warm-up is a failure; a slow but steady fall through the plateau is not."""
    plateau_loss, s = 3.18, Setup(warmup=40, steps=400)
    rng = np.random.default_rng(0)
    noise = list(0.05 * rng.standard_normal(400))
    learns = [2.0 + 2.8 * math.exp(-t / 30) + e for t, e in enumerate(noise)]
    stuck = [3.18 + 1.6 * math.exp(-t / 15) + e for t, e in enumerate(noise)]
    late = stuck[:300] + [2.6 + e for e in noise[300:]]  # stuck to step 300, then learns
    slow = [2.0 + 2.8 * math.exp(-t / 60) + e for t, e in enumerate(noise)]  # crosses ~step 95
    assert stall_steps(learns, plateau_loss, 90) == 0 and not failed(learns, s)
    assert stall_steps(stuck, plateau_loss, 90) == 310 and failed(stuck, s)
    assert 200 <= stall_steps(late, plateau_loss, 90) <= 240 and failed(late, s)
    assert stall_steps(slow, plateau_loss, 90) < 100 and not failed(slow, s)
    assert failed(learns, s, explosion=150)  # an explosion fails a run whatever its loss


@pytest.mark.parametrize("kind", FAULTS)
def test_each_injected_fault_corrupts_what_it_names(kind):
    torch.manual_seed(0)
    model = make_model(Setup(n_layer=2, n_head=2, n_embd=16, block_size=8))
    before = {n: p.detach().clone() for n, p in block_matrices(model)}
    inject(model, kind, {"rank_one": 1.0, "bit_flip": 2.0 ** 16, "weight_scale": 100.0,
                         "lr_jump": 16.0}[kind], torch.Generator().manual_seed(0))
    changed = {n: int((p.detach() != before[n]).sum()) for n, p in block_matrices(model)}
    hit = {n: c for n, c in changed.items() if c}
    if kind == "rank_one":
        assert len(hit) == len(changed)  # every block matrix
    elif kind == "bit_flip":
        [(name, count)] = hit.items()
        assert count == 1 and name.endswith(("fc.weight", "qkv.weight"))
        w = dict(block_matrices(model))[name].detach()
        i = int((w != before[name]).flatten().nonzero())
        assert float(w.flatten()[i]) == pytest.approx(2.0 ** 16 * float(before[name].flatten()[i]))
    elif kind == "weight_scale":
        [name] = hit
        assert name.endswith("attn.qkv.weight")
        torch.testing.assert_close(dict(block_matrices(model))[name].detach(), 100.0 * before[name])
    else:
        assert not hit  # lr_jump acts on the learning rate, in train()
    with pytest.raises(ValueError, match="unknown fault"):
        inject(model, "cosmic_ray", 1.0, torch.Generator())


def test_an_lr_jump_multiplies_the_lr_for_five_steps_only():
    s = Setup(n_layer=1, n_head=1, n_embd=8, block_size=8, batch_size=2, steps=8, warmup=0,
              val_batches=1)
    base = train(RunSpec("none", 1e-3, 0, s))
    jump = train(RunSpec("none", 1e-3, 0, s, fault_step=2, fault_scale=1e4, fault_kind="lr_jump"))
    assert jump.losses[:3] == base.losses[:3]  # identical until the jump acts (step 2's update)
    assert abs(jump.losses[3] - base.losses[3]) > 0.5  # an LR of 10 moves the weights far


def test_the_random_trigger_arm_smooths_at_its_random_steps_only():
    """The random-trigger control (PSS's smoothing, never its detector) acts on exactly
    ``n_random`` steps after the detection warm-up, and records what PSS records."""
    from monitor.schema import PSSConfig
    s = Setup(n_layer=1, n_head=1, n_embd=16, block_size=8, batch_size=4, steps=30, warmup=2,
              val_batches=1)
    r = train(RunSpec("random", 0.05, 0, s, pss=PSSConfig(warmup_steps=5), n_random=3))
    assert len(r.fired) == 3 and all(5 <= t < 30 for t in r.fired)
    assert len(r.k_values) == 3 * len(block_matrices(make_model(s)))  # every block matrix
    assert all(k >= 2 for k in r.k_values) and all(d > 0 for d in r.dw_ratio)
