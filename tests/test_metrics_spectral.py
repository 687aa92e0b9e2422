"""sigma_max, stable rank, top-k SVD and matrix views against full SVDs (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from monitor.metrics import spectral, views


def factors(s: list[float] | torch.Tensor, m: int, n: int, seed: int = 0):
    """Random orthonormal U (m, r), V (n, r) and s (float64): M = U diag(s) Vᵀ, SVD known."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.as_tensor(s, dtype=torch.float64)
    r = len(s)
    U = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64)).Q
    return U, s, V


def with_spectrum(s: list[float] | torch.Tensor, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """U diag(s) Vᵀ with random orthonormal U (m, r), V (n, r): a matrix of chosen spectrum."""
    U, s, V = factors(s, m, n, seed)
    return (U * s) @ V.t()


SPECTRA = {
    "well": lambda: torch.linspace(3.0, 1.0, 20),
    "ill": lambda: torch.logspace(0, -6, 20),
    "near_degenerate_top": lambda: torch.tensor([5.0, 4.999, 4.998] + [1.0] * 10),
    "gap": lambda: torch.tensor([10.0, 2.0, 1.0, 0.5]),
}


@pytest.fixture(params=["lanczos", "exact"])
def path(request, monkeypatch):
    """Run a test through Lanczos (exact SVD off) and through the small-matrix exact SVD."""
    if request.param == "lanczos":
        monkeypatch.setattr(spectral, "EXACT_SIGMA_MAX_DIM", 0)
    return request.param


@pytest.mark.parametrize("name", sorted(SPECTRA))
@pytest.mark.parametrize("shape", [(40, 25), (25, 60)])
def test_sigma_max_and_stable_rank_match_svd(name, shape, path):
    M = with_spectrum(SPECTRA[name](), *shape)
    ref = torch.linalg.svdvals(M)
    result = spectral.power_sigma_max(M.float(), max_iters=500, tol=1e-7)
    assert result.converged
    assert result.sigma == pytest.approx(ref[0].item(), rel=1e-2)
    sr_ref = (ref.pow(2).sum() / ref[0] ** 2).item()
    assert spectral.stable_rank(M.float(), result.sigma) == pytest.approx(sr_ref, rel=1e-2)
    assert result.v.shape == (shape[1],) and result.u.shape == (shape[0],)
    assert torch.linalg.vector_norm(M.float() @ result.v).item() == pytest.approx(result.sigma,
                                                                                 rel=1e-2)


def test_default_tolerance_is_within_one_percent_with_a_gap(path):
    M = with_spectrum(torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5]), 64, 48).float()
    result = spectral.power_sigma_max(M)
    assert result.converged and result.sigma == pytest.approx(4.0, rel=1e-2)


def test_warm_start_converges_in_fewer_iterations():
    M = with_spectrum(torch.tensor([2.0, 1.8, 1.5, 1.0, 0.3]), 150, 100)  # Lanczos, not exact
    cold = spectral.power_sigma_max(M.float(), max_iters=200, tol=1e-6)
    # the weights move a little between logged steps
    M2 = M + 1e-3 * torch.randn_like(M)
    warm = spectral.power_sigma_max(M2.float(), cold.v, max_iters=200, tol=1e-6)
    cold2 = spectral.power_sigma_max(M2.float(), max_iters=200, tol=1e-6)
    assert warm.converged and cold2.converged
    assert warm.iters <= cold2.iters  # the cold start is a block step: already good
    assert warm.sigma == pytest.approx(torch.linalg.svdvals(M2)[0].item(), rel=1e-3)


def test_warm_start_of_wrong_shape_falls_back_to_random(path):
    M = with_spectrum([3.0, 1.0], 10, 8).float()
    result = spectral.power_sigma_max(M, torch.ones(5), max_iters=100, tol=1e-7)
    assert result.sigma == pytest.approx(3.0, rel=1e-3)


def test_warm_start_in_the_null_space_restarts(path):
    M = torch.zeros(4, 3)
    M[0, 0] = 2.0
    result = spectral.power_sigma_max(M, torch.tensor([0.0, 1.0, 0.0]))
    assert result.sigma == pytest.approx(2.0) and result.converged


def test_zero_matrix_gives_zero_without_nan(path):
    result = spectral.power_sigma_max(torch.zeros(6, 4))
    assert result.sigma == 0.0 and not result.converged
    assert torch.isfinite(result.u).all() and torch.isfinite(result.v).all()
    with pytest.raises(ValueError, match="positive"):
        spectral.stable_rank(torch.zeros(6, 4), result.sigma)


def test_nonfinite_matrix_is_flagged_not_raised(path):
    M = torch.randn(5, 5)
    M[1, 2] = float("nan")
    result = spectral.power_sigma_max(M)
    assert math.isnan(result.sigma) and not result.converged
    M[1, 2] = float("inf")
    assert not math.isfinite(spectral.power_sigma_max(M).sigma)


def test_one_by_one(path):
    result = spectral.power_sigma_max(torch.tensor([[-3.0]]))
    assert result.sigma == pytest.approx(3.0) and result.converged
    assert spectral.stable_rank(torch.tensor([[-3.0]]), result.sigma) == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_is_computed_in_float32(dtype, path):
    M = with_spectrum(torch.tensor([6.0, 3.0, 1.0, 0.5]), 32, 24).to(dtype)
    ref = torch.linalg.svdvals(M.double())
    result = spectral.power_sigma_max(M, max_iters=100, tol=1e-6)
    assert result.v.dtype == torch.float32
    assert result.sigma == pytest.approx(ref[0].item(), rel=1e-3)
    sr_ref = (ref.pow(2).sum() / ref[0] ** 2).item()
    assert spectral.stable_rank(M, result.sigma) == pytest.approx(sr_ref, rel=1e-2)


def test_power_iteration_leaves_global_rng_alone(path):
    state = torch.get_rng_state()
    spectral.power_sigma_max(torch.randn(8, 8))
    spectral.top_k_svd(torch.randn(600, 600), 3)
    torch.set_rng_state(state)  # re-set: the calls above used randn for inputs only
    a = torch.randn(3)
    torch.set_rng_state(state)
    spectral.power_sigma_max(torch.ones(8, 8) + torch.eye(8))
    assert torch.equal(a, torch.randn(3))


@pytest.mark.parametrize("shape", [(30, 20), (40, 70), (600, 530)])  # exact, exact, randomized
def test_top_k_svd_matches_known_svd(shape):
    s = torch.cat([torch.tensor([20.0, 15.0, 10.0, 8.0, 6.0]), 0.5 * torch.rand(15)])
    U_ref, s, V_ref = factors(s, *shape)
    M = (U_ref * s) @ V_ref.t()
    U, S, V = spectral.top_k_svd(M.float(), 5)
    assert U.shape == (shape[0], 5) and S.shape == (5,) and V.shape == (shape[1], 5)
    torch.testing.assert_close(S.double(), s[:5], rtol=1e-4, atol=0)
    # singular vectors up to sign
    ones = torch.ones(5, dtype=torch.float64)
    assert torch.allclose((U.double() * U_ref[:, :5]).sum(0).abs(), ones, atol=1e-4)
    assert torch.allclose((V.double() * V_ref[:, :5]).sum(0).abs(), ones, atol=1e-4)
    assert torch.allclose((U.double() * (M @ V.double())).sum(0), S.double(), rtol=1e-4)


def test_top_k_svd_rejects_bad_k():
    with pytest.raises(ValueError, match="k=4"):
        spectral.top_k_svd(torch.randn(3, 5), 4)


# ---------------------------------------------------------------------- views


class Conv1D(nn.Module):
    """Mimics Hugging Face's GPT-2 Conv1D: weight (in, out), y = x @ W + b."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


class Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.c_attn = Conv1D(9, 6)
        self.conv = nn.Conv2d(4, 6, (3, 2), groups=2)
        self.mha = nn.MultiheadAttention(6, 2)
        self.fc = nn.Linear(6, 11)
        self.fc.weight = self.emb.weight  # tied
        self.gain = nn.Parameter(torch.ones(6))
        self.odd = nn.Parameter(torch.randn(3, 4, 5))


def test_layer_kinds_and_matrix_views():
    model = Zoo()
    kinds = views.layer_kinds(model)
    assert list(kinds) == [n for n, _ in model.named_parameters()]
    assert "fc.weight" not in kinds  # tied: appears once, first name
    assert kinds["emb.weight"] == "embedding"
    assert kinds["c_attn.weight"] == "conv1d_hf" and kinds["c_attn.bias"] == "other"
    assert kinds["conv.weight"] == "conv"
    assert kinds["mha.in_proj_weight"] == "mha_in_proj"
    assert kinds["mha.out_proj.weight"] == "linear"
    assert kinds["gain"] == "other" and kinds["odd"] == "other"
    assert views.matrix_view(model.c_attn.weight, "conv1d_hf").shape == (9, 6)
    assert torch.equal(views.matrix_view(model.c_attn.weight, "conv1d_hf"), model.c_attn.weight.t())
    assert views.matrix_view(model.conv.weight, "conv").shape == (6, 2 * 3 * 2)
    assert views.matrix_view(model.odd, "other").shape == (3, 20)
    assert views.matrix_view(model.mha.in_proj_weight, "mha_in_proj").shape == (18, 6)
    assert not views.has_matrix_view(model.gain) and views.has_matrix_view(model.odd)
    with pytest.raises(ValueError, match="no matrix view"):
        views.matrix_view(model.gain)
    with pytest.raises(ValueError, match="kind"):
        views.matrix_view(model.odd, "dense")


def test_matrix_view_is_float32_and_keeps_singular_values():
    w = torch.randn(5, 3, 2, 2).to(torch.bfloat16)
    M = views.matrix_view(w, "conv")
    assert M.dtype == torch.float32 and M.shape == (5, 12)
    torch.testing.assert_close(torch.linalg.svdvals(M),
                               torch.linalg.svdvals(w.float().reshape(5, -1)))


def test_hf_gpt2_kinds():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16,
                                       n_positions=8))
    kinds = views.layer_kinds(model)
    assert kinds["transformer.wte.weight"] == "embedding"
    assert kinds["transformer.h.0.attn.c_attn.weight"] == "conv1d_hf"
    assert "lm_head.weight" not in kinds
