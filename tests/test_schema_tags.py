"""Every tag the hook writes is named by monitor/schema.py (a global TAG_* constant or a
``<metric key>/<layer>`` tag), read back from real event files."""

from __future__ import annotations

import torch
from torch import nn

import monitor
from monitor import schema
from monitor.config import MonitorConfig
from monitor.metrics import spectral
from tests.helpers import read_scalars, read_texts


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 11)

    def forward(self, idx):
        h = self.emb(idx)
        return self.head(self.mha(h, h, h)[0])


def test_every_written_tag_is_in_the_schema(tmp_path, monkeypatch):
    monkeypatch.setattr(spectral, "EXACT_SIGMA_MAX_DIM", 0)  # power_iters=1: unconverged
    torch.manual_seed(0)
    model = Attn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    config = MonitorConfig.preset("full", every=1, ntk_probe=4, power_iters=1)
    with monitor.watch(model, opt, tmp_path, config=config, pss=schema.PSSConfig(
            warmup_steps=0, tau=1.0001)) as mon:
        for _ in range(3):
            idx = torch.randint(0, 11, (6, 5))
            loss = nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            mon.log(loss=loss)
    written = set(read_scalars(str(tmp_path))) | {
        t.removesuffix(schema.TEXT_SUFFIX) for t in read_texts(str(tmp_path))}
    known = {v for k, v in vars(schema).items() if k.startswith("TAG_") and isinstance(v, str)}
    strays = sorted(t for t in written if t not in known and not schema.is_layer_tag(t))
    assert strays == []
    # the run exercised the rare tags too
    assert {schema.TAG_SIGMA_UNCONVERGED, schema.TAG_METRIC_FAILURES, schema.TAG_NTK_PROBE,
            schema.TAG_PSS_INTERVENTION} <= written
    assert "ntk_eig/mha.in_proj_weight" in written and "ntk_eig/mha.out_proj.weight" in written
