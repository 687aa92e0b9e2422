"""PNG export of a chart on the server (optional: kaleido and a Chrome or Chromium)."""

from __future__ import annotations

import os
import shutil
import struct

import numpy as np
import pytest

from dashboard import charts, png

# kaleido is in the `dashboard` extra, so this skips only where no Chrome/Chromium is
# installed and the run does not require one; in CI (.ci/run installs chromium and sets
# REQUIRE_BROWSER_TEST=1, as for tests/test_dashboard_browser.py) it always runs.
needs_kaleido = pytest.mark.skipif(
    os.environ.get("REQUIRE_BROWSER_TEST") != "1" and (
        not png.AVAILABLE or not any(shutil.which(b) for b in ("chromium", "chromium-browser",
                                                               "google-chrome", "chrome"))),
    reason="kaleido or a Chrome/Chromium is absent (apt-get install chromium); runs in CI, "
           "where REQUIRE_BROWSER_TEST=1 turns this skip into a failure")


@needs_kaleido
def test_a_chart_renders_to_a_png_of_the_chart_size():
    fig = charts.heatmap_figure(["a.weight", "b.weight"], np.arange(5), np.random.rand(2, 5),
                                "stable_rank")
    data = png.png_bytes(fig)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert (width, height) == (2 * png.WIDTH, 2 * fig.layout.height)


@needs_kaleido
def test_every_chart_offers_a_png_download(tmp_path, monkeypatch):
    from tests.dashboard_fixtures import write_run
    from tests.test_dashboard_app import open_app, show

    write_run(str(tmp_path / "run"), steps=6)
    at = show(open_app(tmp_path, monkeypatch), "Layers")
    labels = [b.proto.label for b in at.get("download_button")]
    assert labels.count("PNG") == len(at.get("plotly_chart")) >= 2
