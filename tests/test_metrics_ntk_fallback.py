"""NTK of weights used functionally (nn.MultiheadAttention, F.linear on a module's weight,
raw parameters) against explicit per-sample gradients from torch.func, to 1e-4."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from monitor.metrics.ntk_capture import NTKCapture
from tests.test_metrics_ntk import mse, reference

B, N = 6, 4  # batch size, probe size


def run_capture(model: nn.Module, x, y, n: int = N, steps: int = 1):
    """Arm, train ``steps`` times (the last one is the one computed), compute."""
    names = {id(p): name for name, p in model.named_parameters() if p.ndim >= 2}
    cap = NTKCapture(model, names, n=n)
    for _ in range(steps):
        cap.arm()
        model.zero_grad()
        mse(model(x), y).backward()
        values, errors = cap.compute()
        probe = cap.probe_used
        cap.disarm()
    return values, errors, probe


class Encoder(nn.Module):
    """A transformer encoder layer (MHA + MLP) and a readout."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0,
                                                batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x: (B, T, 8)
        if not self.batch_first:
            return self.head(self.layer(x.transpose(0, 1)).transpose(0, 1))
        return self.head(self.layer(x))


class Masked(nn.Module):
    """MHA called directly, seq-first, with a per-sample key padding mask, q != kv."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, kdim=5, vdim=6)  # q/k/v_proj_weight
        self.kv = nn.Parameter(0.5 * torch.randn(4, 5 + 6))

    def forward(self, x):  # x: (B, T, 8)
        q = x.transpose(0, 1)  # (T, B, 8)
        mem = torch.tanh(x[:, :4, :1] * self.kv)  # (B, 4, 11): per-sample keys and values
        k, v = mem[..., :5].transpose(0, 1), mem[..., 5:].transpose(0, 1)
        last = (x[:, :1, 0] > 0).expand(-1, 1)  # padding differs between samples
        mask = torch.cat([torch.zeros_like(x[:, :3, 0], dtype=torch.bool), last], dim=1)
        return self.mha(q, k, v, key_padding_mask=mask)[0].transpose(0, 1)


class Functional(nn.Module):
    """A Linear's weight used through F.linear by its parent, and a raw parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.raw = nn.Parameter(0.3 * torch.randn(3, 8))
        self.out = nn.Linear(3, 3)

    def forward(self, x):
        return self.out(F.linear(torch.tanh(F.linear(x, self.fc.weight, self.fc.bias)), self.raw))


def data(out_dim: int = 3, batch: int = B, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 5, 8, generator=gen), torch.randn(batch, 5, out_dim, generator=gen)


def assert_matches(values: dict, ref: dict) -> None:
    """Every reference layer's lambda_max is logged and within 1e-4 of ``torch.func``'s."""
    for name, value in ref.items():
        assert values[name] == pytest.approx(value, abs=1e-4), name


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_layer_every_weight_matches_torch_func(batch_first):
    torch.manual_seed(0)
    model = Encoder(batch_first)
    x, y = data()
    values, errors, probe = run_capture(model, x, y)
    ref = reference(model, x, y, mse, N)
    assert probe == N
    assert {"layer.self_attn.in_proj_weight", "layer.self_attn.out_proj.weight"} <= set(values)
    if not batch_first:  # the MLP's Linears see (T, B, d): reported, never silently wrong
        for name in ("layer.linear1.weight", "layer.linear2.weight"):
            assert "not the batch size" in errors.pop(name) and name not in values
            ref.pop(name)
    assert errors == {} and set(values) == set(ref)
    assert_matches(values, ref)


def test_mha_with_separate_qkv_weights_and_padding_mask_matches_torch_func():
    torch.manual_seed(1)
    model = Masked()
    x, y = data(out_dim=8)
    values, errors, _ = run_capture(model, x, y)
    ref = reference(model, x, y, mse, N)
    assert errors == {}
    assert {"mha.q_proj_weight", "mha.k_proj_weight", "mha.v_proj_weight",
            "mha.out_proj.weight", "kv"} <= set(values)
    assert_matches(values, ref)


def test_functional_weight_is_learned_then_exact_and_raw_parameter_exact():
    torch.manual_seed(2)
    model = Functional()
    x, y = data()
    values, errors, _ = run_capture(model, x, y)  # first NTK step: the parent is learned
    assert "fc.weight" not in values and "re-running its parent" in errors["fc.weight"]
    ref = reference(model, x, y, mse, N)
    assert values["raw"] == pytest.approx(ref["raw"], abs=1e-4)
    names = {id(p): name for name, p in model.named_parameters() if p.ndim >= 2}
    cap = NTKCapture(model, names, n=N)
    for step in range(2):
        cap.arm()
        model.zero_grad()
        mse(model(x), y).backward()
        values, errors = cap.compute()
        cap.disarm()
    assert errors == {}
    assert_matches(values, ref)


def test_batch_smaller_than_probe_uses_and_reports_the_batch():
    torch.manual_seed(3)
    model = Encoder()
    x, y = data(batch=3)
    values, errors, probe = run_capture(model, x, y, n=16)
    assert probe == 3 and errors == {}
    ref = reference(model, x, y, mse, 3)
    for name, value in ref.items():
        assert values[name] == pytest.approx(value, abs=1e-4), name
        assert 1 - 1e-6 <= values[name] <= 3 + 1e-6


def test_fallback_rerun_leaves_gradients_and_random_stream_alone():
    torch.manual_seed(4)
    model = Encoder()
    x, y = data()
    names = {id(p): name for name, p in model.named_parameters() if p.ndim >= 2}
    cap = NTKCapture(model, names, n=N)
    cap.arm()
    mse(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    state = torch.random.get_rng_state()
    cap.compute()
    cap.disarm()
    assert torch.equal(torch.random.get_rng_state(), state)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n


class WithPosition(nn.Module):
    """A raw (1, T, d) position parameter of the root module, which also returns a loss."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(0.5 * torch.randn(1, 5, 8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x, y=None):
        out = self.fc(torch.tanh(x + self.pos))
        return out if y is None else (mse(out, y), out)


def test_raw_parameter_of_the_root_module_matches_torch_func():
    torch.manual_seed(5)
    model = WithPosition()
    x, y = data()
    values, errors, _ = run_capture(model, x, y)
    ref = reference(model, x, y, mse, N)
    assert errors == {} and set(values) == {"pos", "fc.weight"}
    assert_matches(values, ref)


def test_a_scalar_loss_output_of_an_owner_is_skipped_not_fatal():
    torch.manual_seed(6)
    model = WithPosition()
    x, y = data()
    names = {id(p): name for name, p in model.named_parameters() if p.ndim >= 2}
    cap = NTKCapture(model, names, n=N)
    cap.arm()
    loss, _ = model(x, y)  # the loss (0-d) is an output of the owner: no batch dimension
    loss.backward()
    values, errors = cap.compute()
    cap.disarm()
    assert errors == {}
    assert values["pos"] == pytest.approx(reference(model, x, y, mse, N)["pos"], abs=1e-4)
