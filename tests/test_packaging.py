"""The wheel, as a user gets it: built, installed into a fresh virtual environment, and
`stability-dashboard` started from a directory outside the repository on a monitored run.

Offline: the wheel is built by setuptools' PEP 517 hook in this interpreter (no build
isolation, nothing downloaded) and installed with ``--no-deps --no-index``; the new environment reuses this interpreter's
packages (torch, streamlit) through a ``.pth`` file listing its import path as plain
directories, so no ``.pth`` of theirs runs there (an editable install of this repository
stays invisible). PYTHONPATH is removed, and the test checks that ``monitor`` and
``dashboard`` were imported from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

import monitor
from tests.serving import (assert_local_only, free_port, has_proc_net, listening_addresses, read,
                           stop, wait_healthy)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "monitor", "dashboard")

pytestmark = pytest.mark.slow  # about 20 s: build, install, train a few steps, serve

TINY_RUN = """
import json, sys, torch, monitor, dashboard
torch.manual_seed(0)
torch.set_num_threads(1)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
with monitor.watch(model, opt, logdir=sys.argv[1], every=1, preset="cheap") as mon:
    for _ in range(4):
        loss = model(torch.randn(32, 8)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        mon.log(loss=loss)
print(json.dumps({"monitor": monitor.__file__, "dashboard": dashboard.__file__,
                  "version": monitor.__version__}))
"""


def clean_env() -> dict[str, str]:
    """This environment without what would import the repository or reconfigure Streamlit."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "MONITOR_LOGDIR") and not k.startswith("STREAMLIT_")}


def build_wheel(out: str) -> str:
    """The wheel of a copy of the sources (the checkout stays free of build/ leftovers)."""
    src = os.path.join(out, "src")
    for name in SOURCES:
        path = os.path.join(ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(src, name),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            os.makedirs(src, exist_ok=True)
            shutil.copy(path, src)
    dist = os.path.join(out, "dist")
    # the PEP 517 hook pip would call, without pip's start-up (a few seconds)
    subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                    "build_meta.build_wheel(sys.argv[1])", dist], check=True, env=clean_env(),
                   cwd=src, timeout=300, capture_output=True)
    (wheel,) = os.listdir(dist)
    return os.path.join(dist, wheel)


def reused_paths() -> list[str]:
    """This interpreter's import path (torch, streamlit, ... however they got there) without
    the repository itself. The new venv appends them after its own site-packages, so its
    ``monitor`` and ``dashboard`` are the wheel's whatever else the path holds."""
    root = os.path.realpath(ROOT)
    return [p for p in sys.path if p and os.path.isdir(p) and os.path.realpath(p) != root]


def make_venv(path: str, wheel: str) -> str:
    """A fresh venv holding the wheel and seeing this interpreter's packages; its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", path], check=True,
                   timeout=120)
    python = os.path.join(path, "bin", "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path("
                              "'purelib'))"], check=True, capture_output=True, text=True,
                             env=clean_env()).stdout.strip()
    with open(os.path.join(purelib, "zz_reuse_test_interpreter.pth"), "w") as fh:
        fh.write("\n".join(reused_paths()) + "\n")
    # pip is this interpreter's (seen through the .pth); -I: never touch an installation
    # outside the new environment (this repository's editable one is visible from there)
    subprocess.run([python, "-m", "pip", "install", "-q", "-I", "--no-deps", "--no-index",
                    wheel], check=True, env=clean_env(), timeout=300)
    return python


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    work = tmp_path_factory.mktemp("packaging")
    wheel = build_wheel(str(work))
    python = make_venv(str(work / "venv"), wheel)
    return wheel, python, work


def test_wheel_carries_version_licence_types_config_and_the_command(installed):
    wheel, _, _ = installed
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = f"stability_monitor-{monitor.__version__}.dist-info"
        meta = zf.read(f"{info}/METADATA").decode()
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    assert os.path.basename(wheel) == f"stability_monitor-{monitor.__version__}-py3-none-any.whl"
    assert f"{info}/licenses/LICENSE" in names
    assert {"monitor/py.typed", "dashboard/.streamlit/config.toml", "dashboard/app.py",
            "dashboard/__main__.py"} <= names
    assert not any(n.startswith(("tests/", "demos/", "benchmarks/")) for n in names)
    assert f"Version: {monitor.__version__}\n" in meta
    assert "License-Expression: Apache-2.0\n" in meta and "Project-URL: " in meta
    assert "Classifier: Typing :: Typed\n" in meta
    assert "stability-dashboard = dashboard.cli:main" in entry_points


def test_installed_command_serves_a_run_on_loopback_from_outside_the_repo(installed):
    _, python, work = installed
    outside = work / "elsewhere"
    outside.mkdir()
    done = subprocess.run([python, "-c", TINY_RUN, "runs/tiny"], cwd=outside, env=clean_env(),
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    where = json.loads(done.stdout.strip().splitlines()[-1])
    venv = str(work / "venv")
    assert where["monitor"].startswith(venv) and where["dashboard"].startswith(venv), where
    assert where["version"] == monitor.__version__
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(outside / "runs/tiny"))

    port = free_port()
    log = str(work / "dashboard.log")
    command = os.path.join(venv, "bin", "stability-dashboard")
    with open(log, "w") as out:
        proc = subprocess.Popen([command, "--logdir", "runs", "--port", str(port)],
                                cwd=outside, env=clean_env(), stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_healthy(port, proc, log)
        assert_local_only(port)
        text = read(log)
        assert f"http://127.0.0.1:{port}" in text and str(outside / "runs") in text
        # the packaged dashboard/.streamlit/config.toml was read (gatherUsageStats = false)
        assert "Collecting usage statistics" not in text, text
        proc.terminate()  # SIGTERM to the command's own pid: Streamlit runs in that process
        assert proc.wait(timeout=20) == 0  # a clean stop, like Ctrl-C
        if has_proc_net():
            assert not listening_addresses(port)
    finally:
        stop(proc)
