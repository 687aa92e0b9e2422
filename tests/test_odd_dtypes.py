"""float64 models and sparse-gradient embeddings (issue 15, item 10).

Before: ``_foreach_norm(dtype=float32)`` refused Double tensors and sparse ones, so every
logged step lost every metric, with a warning each step, and PSS never ran. Checked through
``watch()`` with the event files read back by TensorBoard, against norms computed here
from the gradients the step saw.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

import monitor
from monitor import schema
from monitor.metrics import norms
from tests.helpers import read_scalars, read_texts


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_norms_of_float64_and_sparse_tensors_match_dense_references():
    torch.manual_seed(0)
    big = torch.randn(5, 3, dtype=torch.float64) * 1e200  # beyond float32's range
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 0, 2], [1, 1, 0]]),
                                     torch.tensor([3.0, 4.0, math.inf]), (4, 2),
                                     check_invariants=True)  # uncoalesced
    mixed = [torch.randn(4), big, sparse, torch.randn(2, 2, dtype=torch.bfloat16)]
    got = norms.tensor_norms(mixed)
    want = [float(torch.linalg.vector_norm(t.to_dense().double())) for t in mixed]
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    assert got[1] == pytest.approx(want[1], rel=1e-12) and got[1] > 1e200
    assert math.isinf(got[2]) and got[3] == pytest.approx(want[3], rel=1e-6)
    finite_sparse = torch.sparse_coo_tensor(torch.tensor([[0, 0, 2], [1, 1, 0]]),
                                            torch.tensor([3.0, 4.0, 1.0]), (4, 2),
                                            check_invariants=True)
    assert norms.tensor_norms([finite_sparse]) == pytest.approx([math.hypot(7.0, 1.0)])
    assert norms.nonfinite_count([sparse, big]) == 1
    assert norms.global_grad_norm([big, torch.ones(4)]) == pytest.approx(want[1], rel=1e-12)
    csr = finite_sparse.to_dense().to_sparse_csr()
    assert norms.tensor_norms([csr]) == pytest.approx([math.hypot(7.0, 1.0)])


def train(model, params, logdir, batches, pss=None):
    opt = torch.optim.SGD(params, lr=0.05)
    mon = monitor.watch(model, opt, logdir=str(logdir),
                        config=monitor.MonitorConfig.preset("full", every=1), pss=pss)
    seen = []
    for x in batches:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        seen.append({n: p.grad.to_dense().double().norm().item() for n, p in
                     model.named_parameters()})
        opt.step()
    mon.close()
    return seen


def check_run(logdir, seen, caplog):
    scalars = read_scalars(str(logdir))
    assert schema.TAG_METRIC_FAILURES not in scalars, read_texts(str(logdir))
    for step, grads in enumerate(seen):
        for name, value in grads.items():
            assert scalars[f"grad_norm/{name}"][step] == pytest.approx(value, rel=1e-5)
        for key in ("param_norm", "update_ratio", "sigma_max", "stable_rank", "sje"):
            assert any(tag.startswith(key + "/") and step in v for tag, v in scalars.items()), key
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING
                and "took" not in r.getMessage()]  # the overhead notice is not a failure
    assert not warnings, [r.getMessage() for r in warnings]
    return scalars


def test_a_float64_model_gets_every_metric_and_pss(tmp_path, caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    batches = [torch.randn(8, 6, dtype=torch.float64) for _ in range(4)]
    with caplog.at_level(logging.WARNING, logger="monitor"):
        seen = train(model, model.parameters(), tmp_path, batches,
                     pss=schema.PSSConfig(warmup_steps=0))
    scalars = check_run(tmp_path, seen, caplog)
    assert len(scalars[schema.TAG_PSS_TRIGGER_RATIO]) == 4  # PSS ran at every step
    assert model[0].weight.dtype == torch.float64


class SparseBag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8, sparse=True)
        self.head = nn.Linear(8, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(idx))


def test_sparse_gradient_embeddings_get_every_metric(tmp_path, caplog):
    torch.manual_seed(0)
    model = SparseBag()
    batches = [torch.tensor([1, 2, 2, 5, 5, 5]) + i for i in range(4)]  # repeated rows
    params = list(model.parameters())
    with caplog.at_level(logging.WARNING, logger="monitor"):
        seen = train(model, params, tmp_path, batches, pss=schema.PSSConfig(warmup_steps=0))
    check_run(tmp_path, seen, caplog)
    assert model.embed.weight.grad.is_sparse  # the test did exercise sparse gradients
