"""Where the dashboard listens: the `stability-dashboard` command's checks, the app's bind
guard, and a real `streamlit run` from outside the repository (issue 15 item 9, issue 16)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from streamlit import config
from streamlit.testing.v1 import AppTest

import monitor
from dashboard import bind, cli
from tests.dashboard_fixtures import write_run
from tests.serving import assert_local_only, free_port, stop, wait_healthy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(ROOT, "dashboard", "app.py")


@pytest.fixture
def launched(monkeypatch):
    """Run the command up to the point where Streamlit would start; record its arguments."""
    calls: list[list[str]] = []
    monkeypatch.setattr(cli, "run_streamlit", lambda args: calls.append(args) or 0)
    return calls


def test_missing_logdir_exits_with_a_message(tmp_path, capsys, launched):
    missing = tmp_path / "nope"
    assert cli.main(["--logdir", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"the log directory {missing} does not exist" in err and "mkdir -p" in err
    assert not launched


def test_a_file_as_logdir_is_named_a_file(tmp_path, capsys, launched):
    path = tmp_path / "events.out.tfevents.1"
    path.write_bytes(b"")
    assert cli.main(["--logdir", str(path)]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a directory" in err and str(tmp_path) in err
    assert not launched


def test_taken_port_exits_with_a_message(tmp_path, capsys, launched):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["--logdir", str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is already in use" in err and "--port" in err
    assert not launched


def test_taken_port_on_all_interfaces_is_seen_from_loopback(tmp_path, capsys, launched):
    """An accidental dashboard on 0.0.0.0 holds the port for 127.0.0.1 too."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["--logdir", str(tmp_path), "--port", str(port)]) == 2
    assert "already in use" in capsys.readouterr().err


def test_address_of_another_machine_is_refused(tmp_path, capsys, launched):
    assert cli.main(["--logdir", str(tmp_path), "--host", "192.0.2.1"]) == 2
    assert "--host 192.0.2.1 is not an address of this machine" in capsys.readouterr().err
    assert not launched


@pytest.mark.parametrize("argv", [["--port", "0"], ["--port", "70000"], ["--host", ""]])
def test_bad_port_or_empty_host_is_a_usage_error(tmp_path, argv, capsys):
    with pytest.raises(SystemExit) as stop_:
        cli.main(["--logdir", str(tmp_path), *argv])
    assert stop_.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_default_binds_loopback_and_prints_the_url(tmp_path, capsys, launched, monkeypatch):
    port = free_port()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert cli.main(["--port", str(port)]) == 0
    out, err = capsys.readouterr()
    assert f"http://127.0.0.1:{port}" in out and str(tmp_path / "runs") in out
    assert "WARNING" not in err
    args = launched[0]
    assert args[:2] == ["run", os.path.join(ROOT, "dashboard", "app.py")]
    assert "--server.address=127.0.0.1" in args and f"--server.port={port}" in args
    assert args[-3:] == ["--", "--logdir", str(tmp_path / "runs")]  # absolute: cwd-free


def test_host_is_the_opt_in_and_warns(tmp_path, capsys, launched):
    port = free_port()
    assert cli.main(["--logdir", str(tmp_path), "--port", str(port), "--host", "0.0.0.0"]) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "change the PSS settings of running jobs" in err
    assert f"ssh -L {port}:127.0.0.1:{port}" in err
    assert "--server.address=0.0.0.0" in launched[0]


def test_without_the_dashboard_extra_it_says_what_to_install(tmp_path, capsys, launched,
                                                             monkeypatch):
    monkeypatch.setitem(sys.modules, "streamlit", None)  # import streamlit -> ImportError
    assert cli.main(["--logdir", str(tmp_path)]) == 2
    assert "pip install 'stability-monitor[dashboard]'" in capsys.readouterr().err
    assert not launched


def test_logdir_defaults_to_the_environment(tmp_path, capsys, launched, monkeypatch):
    monkeypatch.setenv("MONITOR_LOGDIR", str(tmp_path))
    assert cli.main(["--port", str(free_port())]) == 0
    assert launched[0][-1] == str(tmp_path)


def test_version_and_python_dash_m(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"stability-dashboard {monitor.__version__}"
    done = subprocess.run([sys.executable, "-m", "dashboard", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--logdir" in done.stdout and "--host" in done.stdout


@pytest.mark.parametrize("address, state", [
    (None, "unset"), ("", "unset"), ("127.0.0.1", "local"), ("localhost", "local"),
    ("::1", "local"), ("127.0.0.2", "local"), ("0.0.0.0", "exposed"), ("::", "exposed"),
    ("192.0.2.1", "exposed"), ("no-such-host.invalid", "exposed")])
def test_exposure_of_an_address(address, state):
    assert bind.exposure(address) == state


# ---------------------------------------------------------------------------------------
# The app's guard (AppTest), and a real server started from elsewhere
# ---------------------------------------------------------------------------------------


@pytest.fixture
def address():
    """Set server.address for an AppTest run; restored afterwards."""
    before = config.get_option("server.address")
    yield lambda value: config.set_option("server.address", value)
    config.set_option("server.address", before)


def app_on(logdir, monkeypatch) -> AppTest:
    monkeypatch.setenv("MONITOR_LOGDIR", str(logdir))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_app_on_every_interface_by_accident_shows_nothing_but_how_to_bind(
        tmp_path, monkeypatch, address):
    write_run(str(tmp_path / "demo"), n_layers=2, steps=10)
    address(None)
    at = app_on(tmp_path, monkeypatch)
    (error,) = at.error
    assert "listens on every network interface" in error.value
    ours, theirs = (code.value for code in at.code)
    assert ours == f"stability-dashboard --logdir {tmp_path} --port 8501"
    assert theirs.startswith(f"streamlit run {APP} --server.address 127.0.0.1")
    assert "--server.address 0.0.0.0" in at.info[0].value  # the opt-in, spelled out
    assert not at.sidebar.radio and not at.get("plotly_chart") and not at.button
    assert not at.sidebar.multiselect  # no run names either


def test_app_exposed_on_purpose_works_and_warns(tmp_path, monkeypatch, address):
    write_run(str(tmp_path / "demo"), n_layers=2, steps=10)
    address("0.0.0.0")
    at = app_on(tmp_path, monkeypatch)
    assert any("change the PSS settings of running jobs" in w.value for w in at.sidebar.warning)
    at.sidebar.radio(key="view").set_value("PSS control").run()
    assert at.button(key="pss_apply")  # the form is there: the user asked for this


def test_app_on_loopback_works_without_warning(tmp_path, monkeypatch, address):
    write_run(str(tmp_path / "demo"), n_layers=2, steps=10)
    address("127.0.0.1")
    at = app_on(tmp_path, monkeypatch)
    assert not at.sidebar.warning and not at.error
    assert at.sidebar.radio(key="view").value == "Overview"


def test_streamlit_run_from_another_directory_listens_on_loopback_only(tmp_path):
    """Issue 15 item 9: `streamlit run path/to/dashboard/app.py` from outside the repository
    (no --server.address) listened on every interface; now 127.0.0.1 only, via the config
    file next to app.py."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    port = free_port()
    log = tmp_path / "streamlit.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", APP,
                                 "--server.port", str(port), "--", "--logdir", str(tmp_path)],
                                cwd=elsewhere, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_healthy(port, proc, str(log))
        assert_local_only(port)
    finally:
        stop(proc)
