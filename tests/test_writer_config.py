"""The writer (read back by TensorBoard) and the monitor configuration."""

from __future__ import annotations

import re

import pytest

from monitor import schema
from monitor.config import MonitorConfig
from monitor.writer import EventWriter, default_layout
from tests.helpers import read_scalars, read_texts, summary_events


def test_one_event_carries_all_values_and_tensorboard_reads_them(tmp_path):
    with EventWriter(tmp_path) as w:
        w.write_summary(default_layout([schema.TAG_LOSS]))
        for step in range(3):
            w.write(step, {f"grad_norm/l{i}": step + i / 10 for i in range(50)} | {"train/loss": 1.0 / (step + 1)},
                    {schema.TAG_FAILURE_TEXT: f"- sje/l0: step {step}"})
    w.close()  # idempotent
    events = [e for e in summary_events(str(tmp_path)) if e.summary.value[0].tag != "custom_scalars__config__"]
    assert [len(e.summary.value) for e in events] == [52, 52, 52]
    scalars = read_scalars(str(tmp_path))
    assert scalars["grad_norm/l7"] == {0: pytest.approx(0.7), 1: pytest.approx(1.7), 2: pytest.approx(2.7)}
    assert scalars["train/loss"][2] == pytest.approx(1 / 3)
    texts = read_texts(str(tmp_path))
    assert texts[schema.TAG_FAILURE_TEXT + schema.TEXT_SUFFIX][1] == "- sje/l0: step 1"
    with pytest.raises(RuntimeError, match="closed"):
        w.write(3, {"a/b": 1.0})


def test_layout_has_one_chart_per_metric_with_all_layers():
    from tensorboard.plugins.custom_scalar import layout_pb2

    summary = default_layout([schema.TAG_LOSS])
    layout = layout_pb2.Layout.FromString(summary.value[0].tensor.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    for key in schema.METRIC_KEYS:
        assert charts[key] == [rf"^{key}/.*"]
    assert charts[schema.TAG_LOSS] == [rf"^{schema.TAG_LOSS}$"]


def test_layout_groups_layers_by_kind_with_few_lines_per_chart():
    """A 12-block GPT-2: one chart per metric and kind of layer, <= 12 lines each (it was
    one chart of all 50 layers per metric)."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    kinds = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    names = ["transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"] + [
        f"transformer.h.{i}.{k}" for i in range(12) for k in kinds]
    summary = default_layout([schema.TAG_LOSS], names)
    layout = layout_pb2.Layout.FromString(summary.value[0].tensor.string_val[0])
    by_cat = {cat.title: {c.title: list(c.multiline.tag) for c in cat.chart}
              for cat in layout.category}
    charts = by_cat["stable_rank"]
    assert set(charts) == {f"stable_rank · transformer.h.*.{k}" for k in kinds} | {
        "stable_rank · other"}
    assert all(len(tags) <= 12 for cat in by_cat.values() for tags in cat.values())
    tags = charts["stable_rank · transformer.h.*.mlp.c_fc.weight"]
    assert [t for t in tags if re.search(t, "stable_rank/transformer.h.3.mlp.c_fc.weight")]
    assert not [t for t in tags if re.search(t, "stable_rank/transformer.h.3.mlp.c_proj.weight")]
    for name in names:  # every layer is in exactly one chart per metric
        holding = [title for title, tags in by_cat["sje"].items()
                   if any(re.search(t, f"sje/{name}") for t in tags)]
        assert len(holding) == 1, (name, holding)


def test_config_presets_and_validation():
    full = MonitorConfig.preset("full", every=10)
    assert full.sje_at(30) and full.ntk_at(30) and full.logs(30) and not full.logs(31)
    default = MonitorConfig.preset("default", every=10)
    assert default.sje_at(40) and not default.sje_at(30)
    cheap = MonitorConfig.preset("cheap", every=10)
    assert not cheap.sje_at(0) and not cheap.ntk_at(0)
    with pytest.raises(ValueError, match="ntk_probe"):
        MonitorConfig(ntk_probe=1)
    with pytest.raises(ValueError, match="layers"):
        MonitorConfig(layers="(")
    with pytest.raises(ValueError, match="power_tol"):
        MonitorConfig(power_tol=2.0)


def test_tags_split_at_the_first_slash():
    tag = schema.layer_tag("stable_rank", "blocks.0.attn.c_attn.weight")
    assert schema.split_tag(tag) == ("stable_rank", "blocks.0.attn.c_attn.weight")
    assert schema.is_layer_tag(tag) and not schema.is_layer_tag(schema.TAG_LOSS)
