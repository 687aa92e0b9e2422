"""The demo script trains, logs and prints how to view the run."""

from __future__ import annotations

import json
import os

from demos.train_chargpt import main, parse_args
from monitor import schema
from tests.helpers import read_scalars


def test_demo_trains_a_few_steps_and_writes_a_run(tmp_path, capsys):
    cfg = parse_args(["--logdir", str(tmp_path), "--run-name", "smoke", "--steps", "4",
                      "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "16",
                      "--batch-size", "4", "--every", "2", "--preset", "full", "--pss"])
    logdir = main(cfg)
    assert logdir == os.path.join(str(tmp_path), "smoke")
    logged = read_scalars(logdir)
    assert sorted(logged[schema.TAG_LOSS]) == [0, 2]
    assert sorted(logged["stable_rank/blocks.0.mlp.c_fc.weight"]) == [0, 2]
    assert json.loads(open(os.path.join(logdir, schema.RUN_FILENAME)).read())["status"] == "finished"
    assert "tensorboard --logdir" in capsys.readouterr().out


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if text.encode() in fh.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def test_make_demo_launcher_serves_the_dashboard_on_a_live_run_and_stops_cleanly(tmp_path):
    """demos/launch.py (what `make demo` runs): training in the background, the dashboard
    answering on its port, and SIGTERM to the launcher stops both children, the run closed
    as interrupted."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    logdir = str(tmp_path / "demo-runs")
    launcher = subprocess.Popen([sys.executable, os.path.join(root, "demos", "launch.py"),
                                 "--logdir", logdir, "--port", str(port), "--steps", "100000"],
                                cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, health = time.time() + 120, None
        while time.time() < deadline and health != b"ok":
            time.sleep(0.5)
            try:
                health = urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).read()
            except OSError:
                pass
        assert health == b"ok", "the dashboard did not answer"
        [run] = os.listdir(logdir)
        assert json.loads(open(os.path.join(logdir, run, schema.RUN_FILENAME)).read())["status"] == "running"
        assert len(_processes_mentioning(logdir)) >= 3  # launcher, training, dashboard
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=60) == 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
    deadline = time.time() + 10
    while _processes_mentioning(logdir) and time.time() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(logdir) == []  # no orphans
    # SIGTERM is the demo's Ctrl-C: the run is closed and says it was interrupted
    assert json.loads(open(os.path.join(logdir, run, schema.RUN_FILENAME)).read())["status"] == "interrupted"
