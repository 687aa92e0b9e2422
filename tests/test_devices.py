"""The same checks on every device: CPU always, CUDA where a GPU exists (skipped otherwise).

The CPU arm runs in CI and keeps these tests honest; the CUDA arm checks that the metrics,
the smoothing and a whole monitored job with PSS give the reference answers with tensors
on the GPU (references are computed on the CPU in float64).
"""

from __future__ import annotations

import math

import pytest
import torch

import monitor
from demos.model import GPT, GPTConfig
from monitor import schema
from monitor.metrics import energy, spectral
from monitor.pss import smooth
from monitor.schema import PSSConfig
from tests.helpers import all_finite, read_scalars
from tests.test_metrics_energy import sje_reference, true_gradient
from tests.test_metrics_spectral import with_spectrum

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device; runs on GPU machines")]),
]


@pytest.fixture(autouse=True)
def _exact_matmul():
    """TF32 would put 1e-3 errors into float32 matmuls on Ampere and later."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(96, 64), (600, 700)])  # exact and randomized top-k paths
def test_spectral_metrics_and_sje_on_device(device, shape):
    m, n = shape
    s = torch.logspace(0, -3, min(m, n))
    M = with_spectrum(s, m, n).float()
    G = true_gradient(M)
    ref_s = torch.linalg.svdvals(M.double())
    on = M.to(device)
    power = spectral.power_sigma_max(on, max_iters=300, tol=1e-7)
    assert power.sigma == pytest.approx(ref_s[0].item(), rel=1e-3)
    sr_ref = (ref_s.pow(2).sum() / ref_s[0] ** 2).item()
    assert spectral.stable_rank(on, power.sigma) == pytest.approx(sr_ref, rel=1e-2)
    value, k = energy.sje(on, G.to(device), sigma=power.sigma)
    ref, k_ref = sje_reference(M, G)
    assert k == k_ref
    assert value == pytest.approx(ref, rel=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["conv", "softmax", "log", "softplus", "clip"])
def test_smooth_on_device_matches_the_cpu_reference(device, method):
    s = torch.tensor([8.0, 3.0, 2.5, 2.0, 1.0, 0.5, 0.25, 0.1])
    W = with_spectrum(s, 40, 30).float()
    k = 4
    out = smooth(W.to(device), method, k=k)
    assert out.device.type == torch.device(device).type and out.dtype == W.dtype
    got = torch.linalg.svdvals(out.cpu().double())[: len(s)]  # W has rank len(s)
    # the tail is kept, the top k are changed by the method's function of the top k
    assert torch.allclose(got[k:], s[k:].double(), rtol=1e-5)
    expected = torch.linalg.svdvals(smooth(W.double(), method, k=k).double())[: len(s)]
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_monitored_job_with_pss_on_device(tmp_path, device, dtype):
    """Every tag of a char-GPT job, with a spike that makes PSS act, finite on the device."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32)).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    steps, spike_at = 8, 6
    pss = PSSConfig(warmup_steps=3, method="conv")
    with monitor.watch(model, opt, tmp_path, every=1, preset="full", pss=pss) as mon:
        for step in range(steps):
            x = torch.randint(0, 128, (4, 16), generator=gen).to(device)
            _, loss = model(x, x)
            (loss * (50.0 if step == spike_at else 1.0)).backward()  # a gradient spike
            opt.step()
            opt.zero_grad()
            mon.log(loss=loss)
    logged = read_scalars(str(tmp_path))
    assert schema.TAG_METRIC_FAILURES not in logged
    matrices = [n for n, p in model.named_parameters() if p.ndim >= 2]
    for name in matrices:
        for metric in ("stable_rank", "sigma_max", "sje", "ntk_eig", "grad_norm", "lr_effective"):
            series = logged[f"{metric}/{name}"]
            assert sorted(series) == list(range(steps)) and all_finite(series), (metric, name)
    interventions = {s for s, v in logged[schema.TAG_PSS_INTERVENTION].items() if v == 1}
    assert spike_at in interventions
    smoothed = [n for n in matrices if f"pss_sigma_after/{n}" in logged]
    assert smoothed
    for name in smoothed:
        assert logged[f"pss_sigma_after/{name}"][spike_at] < logged[f"pss_sigma_before/{name}"][spike_at]
    for p in model.parameters():
        assert p.device.type == torch.device(device).type and p.dtype == dtype
        assert math.isfinite(float(p.detach().float().abs().max()))
