"""PSS smoothing against a full SVD: the tail is kept, only the top k change, f flattens."""

from __future__ import annotations

import math

import pytest
import torch

from monitor.metrics import spectral
from monitor.pss import smooth, smoothing_function
from monitor.pss.smoothing import smooth_matrix
from monitor.schema import PSS_METHODS


def with_spectrum(s: torch.Tensor, m: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return ((U * s.double()) @ V.T).float()


def check_flattening(before: torch.Tensor, after: torch.Tensor, k: int, method: str) -> None:
    """The SPEC 3 contract, on full-SVD singular values (float64)."""
    top = before[:k]
    tail_ref = before[k:]
    # the new top-k values are the k largest of `after` only if they stay above the tail,
    # so compare the multiset: remove the tail values from `after` and what is left is f
    rest = after.clone()
    tail = []
    for value in tail_ref:  # match each tail value to the closest remaining value
        i = int(torch.argmin((rest - value).abs()))
        tail.append(float(rest[i]))
        rest = torch.cat([rest[:i], rest[i + 1:]])
    f = rest.sort(descending=True).values
    assert torch.allclose(torch.tensor(tail, dtype=torch.float64), tail_ref, rtol=1e-5, atol=1e-7), \
        f"{method}: tail singular values changed"
    assert len(f) == k
    assert (f >= -1e-6).all(), f"{method}: negative"
    assert f[0] <= top[0] * (1 + 1e-5), f"{method}: sharpened (first value above sigma_1)"
    if method in ("conv", "softmax"):
        assert f.sum() == pytest.approx(top.sum().item(), rel=1e-5), f"{method}: sum not kept"
    if method == "clip":
        assert torch.allclose(f, torch.full_like(f, float(top[-1])), rtol=1e-5)


@pytest.mark.parametrize("method", PSS_METHODS)
@pytest.mark.parametrize("spectrum", ["gapped", "slow"])
def test_each_method_against_full_svd(method, spectrum):
    n = 96
    if spectrum == "gapped":  # a few dominant values, then a flat-ish tail
        s = torch.cat([torch.tensor([20.0, 12.0, 9.0, 7.0]), torch.linspace(2.0, 0.1, n - 4)])
    else:  # slowly decaying: 1/sqrt(i), no gap anywhere
        s = 1.0 / torch.arange(1, n + 1).double().sqrt()
    M = with_spectrum(s, 128, n, seed=1)
    before = torch.linalg.svdvals(M.double())
    sr = (before.pow(2).sum() / before[0] ** 2).item()
    k = max(1, math.floor(sr))
    out = smooth(M, method)
    after = torch.linalg.svdvals(out.double())
    check_flattening(before, after, k, method)


@pytest.mark.parametrize("method", PSS_METHODS)
def test_randomized_path_is_accurate_on_a_slowly_decaying_spectrum(method, monkeypatch):
    """Force the randomized range finder (large-matrix path) on 1/sqrt(i), 256 x 512."""
    monkeypatch.setattr(spectral, "EXACT_SVD_MAX_DIM", 0)
    s = 1.0 / torch.arange(1, 257).double().sqrt()
    M = with_spectrum(s, 256, 512, seed=2)
    before = torch.linalg.svdvals(M.double())
    k = 8
    M_new, info = smooth_matrix(M, method, k)
    after = torch.linalg.svdvals(M_new.double())
    check_flattening(before, after, k, method)
    assert info["sigma_before"] == pytest.approx(before[0].item(), rel=1e-5)
    assert info["sigma_after"] == pytest.approx(after[0].item(), rel=1e-4)


def test_smoothing_functions_alone():
    s = torch.tensor([10.0, 4.0, 3.0, 2.5, 2.0], dtype=torch.float64)
    for method in PSS_METHODS:
        f = smoothing_function(s, method)
        assert (f[:-1] >= f[1:] - 1e-12).all() and (f >= 0).all() and f[0] <= s[0], method
    conv = smoothing_function(s, "conv", window=3)  # half-sample-symmetric moving average
    assert conv.tolist() == pytest.approx([8.0, 17 / 3, 19 / 6, 2.5, 13 / 6])
    assert conv.sum().item() == pytest.approx(s.sum().item())
    soft = smoothing_function(s, "softmax")  # T = sigma_1 bounds the ratio by e
    assert (soft[0] / soft[-1]).item() <= math.e + 1e-9
    sharper = smoothing_function(s, "softmax", temperature=0.5)  # raised to sigma_1
    assert torch.allclose(sharper, soft)
    log = smoothing_function(s, "log", c=1.0)
    assert log[0].item() == pytest.approx(2.0 + math.log(9.0))
    assert smoothing_function(s, "clip").tolist() == [2.0] * 5
    with pytest.raises(ValueError, match="window"):
        smoothing_function(s, "conv", window=2)
    with pytest.raises(ValueError, match="one of"):
        smoothing_function(s, "median")


@pytest.mark.parametrize("kind,shape", [("linear", (24, 16)), ("conv1d_hf", (16, 24)),
                                        ("conv", (8, 4, 3, 3)), ("other", (6, 5, 4))])
def test_smooth_keeps_shape_dtype_and_uses_the_matrix_view(kind, shape):
    W = torch.randn(*shape).to(torch.bfloat16)
    out = smooth(W, "clip", kind=kind)
    assert out.shape == W.shape and out.dtype == torch.bfloat16
    from monitor.metrics.views import matrix_view

    before = torch.linalg.svdvals(matrix_view(W, kind).double())
    after = torch.linalg.svdvals(matrix_view(out, kind).double())
    assert after[0] < before[0]
    assert after[-1] == pytest.approx(before[-1].item(), rel=2e-2)  # bf16 rounding


def test_smooth_refuses_non_finite_and_bad_k():
    W = torch.randn(8, 8)
    with pytest.raises(ValueError, match="k="):
        smooth(W, "conv", k=9)
    W[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        smooth(W, "conv")


def rank_one_dominated(n: int = 48, seed: int = 3) -> torch.Tensor:
    """sigma_1 = 30 over a tail of 1 .. 0.05: stable rank ~1.04, so SPEC's k is 1."""
    s = torch.cat([torch.tensor([30.0]), torch.linspace(1.0, 0.05, n - 1)])
    return with_spectrum(s, 64, n, seed=seed)


@pytest.mark.parametrize("method", PSS_METHODS)
def test_the_singularity_gap_k1_changes_nothing(method):
    """The paper's rule (k_min=1): with SR -> 1, k = floor(SR) = 1 and every f leaves one
    value unchanged. Why the default is k_min = 2."""
    M = rank_one_dominated()
    before = torch.linalg.svdvals(M.double())
    assert (before.pow(2).sum() / before[0] ** 2).item() < 2
    M_new, info = smooth_matrix(M, method, k_min=1)
    assert info["k"] == 1
    after = torch.linalg.svdvals(M_new.double())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", PSS_METHODS)
def test_k_min_2_flattens_a_rank_one_dominated_matrix(method):
    M = rank_one_dominated()
    before = torch.linalg.svdvals(M.double())
    M_new, info = smooth_matrix(M, method, k_min=2)
    assert info["k"] == 2
    after = torch.linalg.svdvals(M_new.double())
    check_flattening(before, after, 2, method)  # the tail beyond sigma_2 is kept exactly
    assert after[0] < 0.8 * before[0], method  # sigma_1 pulled towards sigma_2 = 1
    assert info["sr_after"] > 1.1 * info["sr_before"]
    out = smooth(M, method, k_min=2)  # the public function takes it too
    torch.testing.assert_close(out, M_new)


def test_k_min_bounds():
    M = rank_one_dominated()
    assert smooth_matrix(M, "conv", k_min=100)[1]["k"] == 48  # at most min(shape)
    assert smooth_matrix(M, "conv", k_min=5, k_max=3)[1]["k"] == 3  # k_max caps
    assert smooth_matrix(M, "conv", 1, k_min=4)[1]["k"] == 1  # an explicit k is used as given
    assert smooth_matrix(torch.randn(1, 9), "conv", k_min=2)[1]["k"] == 1  # a single row
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="k_min"):
            smooth_matrix(M, "conv", k_min=bad)


@pytest.mark.parametrize("method", PSS_METHODS)
def test_the_default_k_rule_acts_at_stable_rank_one(method):
    """Issue 11: at SR ~ 1 the default (k_min = 2, smooth() and PSSConfig) changes the weight."""
    from monitor.schema import PSSConfig

    M = rank_one_dominated()
    assert PSSConfig().k_min == 2
    M_new, info = smooth_matrix(M, method)
    assert info["k"] == 2 and info["sr_before"] < 1.5
    assert float((M_new - M).norm() / M.norm()) > 0.01, method
    torch.testing.assert_close(smooth(M, method), M_new)


def _conv_reference(s: list[float], window: int) -> list[float]:
    """Slow reference: moving average of width 2h + 1, h = min(window // 2, k - 1), over the
    half-sample-symmetric extension ... s1 s0 | s0 s1 ... s_{k-1} | s_{k-1} s_{k-2} ..."""
    k = len(s)
    h = min(window // 2, k - 1)
    ext = list(reversed(s[:h])) + s + list(reversed(s[k - h:])) if h else list(s)
    return [sum(ext[i: i + 2 * h + 1]) / (2 * h + 1) for i in range(k)]


@pytest.mark.parametrize("window", [1, 3, 5, 7, 9, 11, 15])
def test_conv_keeps_the_top_values_in_order_for_every_window_and_k(window):
    """Issue 11: window 5 on [10, 5] gave [7, 8]; window 9 with k = 4 an increasing vector."""
    g = torch.Generator().manual_seed(window)
    cases = [[10.0, 5.0], [10.0, 8.0, 4.0, 1.0], [1.0] * 5 + [0.0], [30.0] + [1.0] * 6]
    for k in range(1, 13):
        for power in (0.5, 1.0, 4.0, 12.0):  # from flat to steeply decaying spectra
            s = torch.rand(k, generator=g, dtype=torch.float64).pow(power).sort(descending=True).values
            cases.append(s.tolist())
    for s in cases:
        f = smoothing_function(torch.tensor(s, dtype=torch.float64), "conv", window=window)
        assert (f[1:] <= f[:-1] + 1e-12).all(), (window, s, f)  # non-increasing
        assert f[0] <= s[0] + 1e-12 and (f >= 0).all()
        assert float(f.sum()) == pytest.approx(sum(s), rel=1e-12, abs=1e-12)
        torch.testing.assert_close(f, torch.tensor(_conv_reference(s, window), dtype=torch.float64))
