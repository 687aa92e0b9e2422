"""The README stays true: every tag and metric key the schema defines is documented there."""

from __future__ import annotations

import os

from monitor import schema

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_documents_every_tag_and_metric_key():
    text = open(README, encoding="utf-8").read()
    tags = [value for name, value in vars(schema).items()
            if name.startswith("TAG_") and isinstance(value, str)]
    names = list(schema.METRIC_KEYS) + list(schema.PSS_LAYER_METRICS) + tags
    assert len(names) > 25
    missing = [name for name in names if f"`{name}`" not in text]
    assert not missing, f"README.md does not document: {missing}"
