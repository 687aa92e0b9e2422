"""The dashboard in a real headless Chromium: charts render, a PSS threshold is applied.

Starts ``streamlit run dashboard/app.py`` on a free localhost port against a fixture run,
drives Debian's ``chromium`` with Playwright, and saves screenshots under
``test-artifacts/`` (kept by CI as artifacts, ignored by git).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from monitor import schema
from monitor.writer import EventWriter
from tests.dashboard_fixtures import write_run

CHROMIUM = "/usr/bin/chromium"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(ROOT, "test-artifacts")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

# Skipped only where chromium is absent and the run does not require it: .ci/run installs
# chromium and sets REQUIRE_BROWSER_TEST=1, so in CI a missing browser fails the test.
REQUIRED = os.environ.get("REQUIRE_BROWSER_TEST") == "1"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM) and not REQUIRED,
                       reason=f"{CHROMIUM} is absent: apt-get install chromium. Runs in CI, where "
                              ".ci/run installs it and REQUIRE_BROWSER_TEST=1 turns this skip into a failure"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}: "
                               f"{proc.stdout.read().decode(errors='replace')}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"streamlit did not answer on {url} within {timeout} s")


@pytest.fixture
def server(tmp_path):
    logdir = tmp_path / "runs"
    write_run(str(logdir / "demo"), n_layers=8, steps=60)
    with streamlit_on(logdir) as url:
        yield url, logdir / "demo"


@contextlib.contextmanager
def streamlit_on(logdir):
    """``streamlit run dashboard/app.py`` on a free port over ``logdir``; yields its URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", os.path.join(ROOT, "dashboard", "app.py"),
           "--server.port", str(port), "--server.address", "127.0.0.1",
           "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none", "--", "--logdir", str(logdir)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_charts_render_and_threshold_is_applied(server):
    from playwright.sync_api import sync_playwright

    url, run_dir = server
    os.makedirs(ARTIFACTS, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1500})
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
            page.get_by_text("stable rank collapse", exact=True).first.wait_for(timeout=30_000)
            page.screenshot(path=os.path.join(ARTIFACTS, "dashboard_overview.png"),
                            full_page=True)

            page.get_by_text("Layers", exact=True).click()
            page.get_by_text("stable_rank: layer x step").wait_for(timeout=30_000)
            page.wait_for_selector(".js-plotly-plot .heatmaplayer", timeout=30_000)
            page.screenshot(path=os.path.join(ARTIFACTS, "dashboard_layers.png"),
                            full_page=True)

            page.get_by_text("PSS control", exact=True).click()
            tau = page.get_by_role("spinbutton", name="tau (trigger ratio)")
            tau.wait_for(timeout=30_000)
            tau.fill("3.5")
            tau.press("Enter")
            page.get_by_text("With tau=3.5").wait_for(timeout=30_000)
            page.get_by_role("button", name="Apply").click()
            page.get_by_text("Wrote control.json version 1").wait_for(timeout=30_000)
            page.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
            page.screenshot(path=os.path.join(ARTIFACTS, "dashboard_pss.png"), full_page=True)
        finally:
            browser.close()
    control = json.loads((run_dir / schema.CONTROL_FILENAME).read_text())
    assert control["version"] == 1
    assert control["settings"]["tau"] == 3.5
    assert schema.read_control(run_dir).settings.tau == 3.5


def charts_drawn(page) -> list[int]:
    """Traces per Plotly chart on the page, as the browser's Plotly holds them."""
    return page.evaluate("Array.from(document.querySelectorAll('.js-plotly-plot'))"
                         ".map(gd => (gd.data || []).length)")


def wait_charts(page, n: int) -> list[int]:
    """Until ``n`` charts or more are drawn, each with at least one trace."""
    page.wait_for_function(
        "n => { const g = Array.from(document.querySelectorAll('.js-plotly-plot'));"
        " return g.length >= n && g.every(gd => gd.data && gd.data.length &&"
        " gd.querySelector('.main-svg')); }", arg=n, timeout=30_000)
    return charts_drawn(page)


def test_live_run_turns_finished_and_every_view_draws(tmp_path):
    """A live run's row moves under live refresh (last step, then finished) with no click;
    the new views (alert chart, relative heatmap, per-run LR heatmaps, run config) draw."""
    from playwright.sync_api import sync_playwright

    logdir = tmp_path / "runs"
    write_run(str(logdir / "live"), n_layers=8, steps=40, status="running")
    with EventWriter(str(logdir / "live")) as writer:
        writer.write(0, {}, {schema.TAG_RUN_CONFIG: '```json\n{"monitor": {"every": 10}}\n```'})
    os.makedirs(ARTIFACTS, exist_ok=True)
    with streamlit_on(logdir) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1500})
            page.goto(url, wait_until="domcontentloaded")
            table = page.locator("[data-testid='stTable']").first
            table.wait_for(timeout=60_000)
            assert "live" in table.inner_text() and "390" in table.inner_text()
            write_run(str(logdir / "live"), n_layers=8, steps=5, start_step=40,
                      status="finished")
            page.wait_for_function(  # the fragment re-reads: no click, no reload
                "() => { const t = document.querySelector(\"[data-testid='stTable']\");"
                " return t && t.innerText.includes('finished') && t.innerText.includes('440'); }",
                timeout=90_000)
            assert wait_charts(page, 2)  # the alerted layer and the loss
            page.screenshot(path=os.path.join(ARTIFACTS, "dashboard_overview_live.png"),
                            full_page=True)
            # the run is over: stop refreshing, so views are not redrawn under the clicks
            page.get_by_text("Live refresh", exact=True).click()
            page.wait_for_function("() => !document.querySelector(\"input[aria-label="
                                   "'Live refresh']\").checked", timeout=60_000)

            page.get_by_text("Layers", exact=True).click()
            page.get_by_text("relative to the layer's first value").click()
            # the chart's title (Plotly may hold a second, hidden copy of it while redrawing)
            page.locator(".js-plotly-plot .gtitle").filter(
                has_text="stable_rank: layer x step").first.wait_for(timeout=60_000)
            page.wait_for_selector(".js-plotly-plot .heatmaplayer", timeout=60_000)
            page.locator(".js-plotly-plot .cbtitle").filter(
                has_text="first value").wait_for(timeout=60_000)  # redrawn relative
            assert wait_charts(page, 2)
            page.screenshot(path=os.path.join(ARTIFACTS, "dashboard_layers_relative.png"),
                            full_page=True)

            page.get_by_text("Learning rates", exact=True).click()
            page.get_by_text("effective learning rate: layer x step").wait_for(timeout=60_000)
            assert wait_charts(page, 2)
            page.screenshot(path=os.path.join(ARTIFACTS, "dashboard_lr.png"), full_page=True)

            page.get_by_text("Run config", exact=True).click()
            page.get_by_text("as the job logged it").wait_for(timeout=60_000)
            page.locator("[data-testid='stJson']").get_by_text("every").first.wait_for(
                timeout=60_000)  # the JSON drawn, not its placeholder
            page.screenshot(path=os.path.join(ARTIFACTS, "dashboard_config.png"),
                            full_page=True)
        except Exception:
            page.screenshot(path=os.path.join(ARTIFACTS, "dashboard_failure.png"), full_page=True)
            raise
        finally:
            browser.close()
