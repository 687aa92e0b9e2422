"""`make demo`: train the demo char-GPT in the background and open the dashboard on its logs.

    python demos/launch.py [--logdir runs] [--port 8501] [--steps 300] [--no-dashboard]

The training runs with PSS enabled, so the dashboard's PSS form steers a live job. Ctrl-C
stops both. Without the dashboard (or with --no-dashboard) it trains in the foreground and
prints the TensorBoard command.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs")
    parser.add_argument("--port", type=int, default=8501)
    parser.add_argument("--address", default="127.0.0.1", help="dashboard bind address")
    # 300 steps: about 3 minutes on 2 CPU cores, and the default run (seed 1337) has a
    # gradient-norm bump that PSS smooths at step 236; pass more to watch longer
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--no-dashboard", action="store_true")
    parser.add_argument("--spike-at", type=int, default=0,
                        help="push the demo into a loss spike at this step (an alert fires)")
    args = parser.parse_args()
    train_cmd = [sys.executable, os.path.join(ROOT, "demos", "train_chargpt.py"),
                 "--logdir", args.logdir, "--steps", str(args.steps), "--pss"]
    if args.spike_at:
        train_cmd += ["--spike-at", str(args.spike_at)]
    app = os.path.join(ROOT, "dashboard", "app.py")
    has_dashboard = os.path.exists(app) and importlib.util.find_spec("streamlit") is not None
    if args.no_dashboard or not has_dashboard:
        return subprocess.call(train_cmd)
    dash_cmd = [sys.executable, "-m", "streamlit", "run", app, "--server.address", args.address,
                "--server.port", str(args.port), "--server.headless", "true",
                "--browser.gatherUsageStats", "false", "--", "--logdir", args.logdir]
    # SIGTERM (kill, a supervisor) stops both children like Ctrl-C does: no orphans
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    children: list[subprocess.Popen] = []
    try:
        started = time.time()
        children.append(subprocess.Popen(train_cmd))
        wait_for_run(args.logdir, started)  # so the dashboard opens on the new run at once
        children.append(subprocess.Popen(dash_cmd))
        print(f"\ndashboard: http://{args.address}:{args.port}   (training runs in the "
              "background; Ctrl-C stops both)\n", flush=True)
        train, dash = children
        said = False
        while dash.poll() is None:
            if train.poll() is not None and not said:
                said = True
                print(f"\ntraining ended (exit code {train.returncode}); the dashboard keeps "
                      "running until Ctrl-C\n", flush=True)
            time.sleep(0.5)
        return dash.returncode
    except KeyboardInterrupt:
        return 0
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()


def wait_for_run(logdir: str, since: float, timeout: float = 20.0) -> None:
    """Until an event file newer than ``since`` appears under ``logdir`` (or ``timeout``)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        files = glob.glob(os.path.join(glob.escape(logdir), "*", "events.out.tfevents.*"))
        if any(os.path.getmtime(f) >= since for f in files):
            return
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
