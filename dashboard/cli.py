"""``stability-dashboard``: the dashboard as an installed command, like ``tensorboard``.

    stability-dashboard --logdir runs [--port 8501] [--host 127.0.0.1]
    python -m dashboard --logdir runs          # the same

It checks the log directory and the port first (a clear message and exit code 2 instead of
a traceback), prints the URL, then runs Streamlit in this process (so the server has this
process's id) on the packaged ``dashboard/app.py``, whose ``.streamlit/config.toml`` beside
it sets the rest. It always passes ``--server.address``: 127.0.0.1 by default from any
working directory; ``--host`` is the explicit opt-in to listen on other interfaces, with a
warning (see ``dashboard.bind``).
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys

from dashboard import bind

# Beyond dashboard/.streamlit/config.toml: no file watcher, as an installed app's source does
# not change while it runs.
STREAMLIT_FLAGS = {"server.fileWatcherType": "none"}


class LaunchError(Exception):
    """A problem the user can fix before the server starts; the message says how."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from monitor import __version__

    parser = argparse.ArgumentParser(
        prog="stability-dashboard",
        description="Open the training-stability dashboard on a directory of runs.")
    parser.add_argument("--logdir", default=os.environ.get("MONITOR_LOGDIR") or "runs",
                        help="directory holding the runs, each written by monitor.watch(..., "
                             "logdir=DIR/<run>) (default: $MONITOR_LOGDIR, else ./runs)")
    parser.add_argument("--port", type=int, default=8501, help="TCP port (default 8501)")
    parser.add_argument("--host", default=bind.LOCAL,
                        help="address to listen on (default 127.0.0.1: this machine only). "
                             "Another address lets others reach the dashboard, and its PSS "
                             "form changes running jobs: prefer an SSH tunnel")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port {args.port}: expected a port between 1 and 65535")
    if not args.host:
        parser.error("--host is empty: give an address, e.g. 127.0.0.1 (this machine only) or "
                     "0.0.0.0 (every interface)")
    return args


def check_logdir(logdir: str) -> str:
    """The absolute log directory; :class:`LaunchError` when it is missing or not a directory."""
    path = os.path.abspath(logdir)
    if not os.path.exists(path):
        raise LaunchError(
            f"the log directory {path} does not exist. Pass the directory your runs are "
            "written under (monitor.watch(..., logdir=DIR/<run>) -> --logdir DIR); to open "
            f"the dashboard before the first run starts, create it: mkdir -p {path}")
    if not os.path.isdir(path):
        raise LaunchError(
            f"--logdir {path} is a file, not a directory: pass the directory that holds the "
            f"runs (perhaps {os.path.dirname(path)})")
    if not os.access(path, os.R_OK | os.X_OK):
        raise LaunchError(f"the log directory {path} is not readable by this user")
    return path


def check_port(host: str, port: int) -> None:
    """Bind and release ``host:port`` as the server will (SO_REUSEADDR), so that a taken
    port or an address of another machine is reported before Streamlit starts."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (OSError, UnicodeError) as err:
        raise LaunchError(f"--host {host}: not an address this machine can resolve ({err})")
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise LaunchError(
                    f"port {port} on {host} is already in use (another dashboard? "
                    f"`ss -ltnp 'sport = :{port}'` names the process); pick another with "
                    f"--port {port + 1}") from None
            if err.errno == errno.EADDRNOTAVAIL:
                raise LaunchError(f"--host {host} is not an address of this machine") from None
            raise LaunchError(f"cannot listen on {host}:{port}: {err.strerror}") from None


def url_of(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::"):  # every interface: the name others reach this machine by
        host = socket.gethostname()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def streamlit_args(logdir: str, host: str, port: int) -> list[str]:
    """``streamlit run`` arguments: the packaged app, the bind address, the log directory."""
    app = os.path.join(os.path.dirname(os.path.abspath(__file__)), "app.py")
    flags = [f"--{key}={value}" for key, value in STREAMLIT_FLAGS.items()]
    return ["run", app, f"--server.address={host}", f"--server.port={port}", *flags,
            "--", "--logdir", logdir]


def run_streamlit(args: list[str]) -> int:
    """Run Streamlit's own command line in this process; returns its exit code."""
    from streamlit.web import cli as streamlit_cli

    try:
        streamlit_cli.main(args=args, prog_name="streamlit", standalone_mode=False)
    except SystemExit as stop:  # Streamlit exits this way on its own errors
        return stop.code if isinstance(stop.code, int) else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import streamlit  # noqa: F401
    except ImportError:
        print("stability-dashboard: the dashboard needs its extra: "
              "pip install 'stability-monitor[dashboard]'", file=sys.stderr)
        return 2
    try:
        logdir = check_logdir(args.logdir)
        check_port(args.host, args.port)
    except LaunchError as err:
        print(f"stability-dashboard: {err}", file=sys.stderr)
        return 2
    if not bind.is_loopback(args.host):
        print(f"stability-dashboard: WARNING: {bind.exposed_warning(args.host, args.port)}",
              file=sys.stderr, flush=True)
    print(f"stability-dashboard: {url_of(args.host, args.port)}  (runs under {logdir}; "
          "Ctrl-C stops it)", flush=True)
    return run_streamlit(streamlit_args(logdir, args.host, args.port))
