"""Where the dashboard listens, and the rule that keeps it off the network by accident.

The PSS form writes ``control.json`` into running jobs: anyone who can reach the port can
change a job's settings (and read its metrics). So the dashboard listens on 127.0.0.1 unless
the user asks for more, however it was started:

- ``stability-dashboard`` and ``python -m dashboard`` (``dashboard.cli``) always pass
  ``--server.address`` (127.0.0.1; ``--host`` changes it);
- ``streamlit run path/to/dashboard/app.py``, from any working directory, reads
  ``dashboard/.streamlit/config.toml`` beside the script (Streamlit >= 1.46; packaged with
  the app), which says 127.0.0.1;
- should ``server.address`` still be unset (an older Streamlit reads config files from the
  working directory and ``~/.streamlit`` only; an ASGI launcher skips the script's config),
  Streamlit listens on every interface: then the page shows nothing (:func:`guard`) but how
  to restart it bound to this machine.

An address set explicitly (``--server.address``, ``STREAMLIT_SERVER_ADDRESS``, a config
file) is the user's opt-in and is obeyed, with a warning when it is not a loopback address.
This module imports streamlit only inside :func:`guard`, so the command line can explain a
missing ``dashboard`` extra.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import shlex
import socket
import sys

LOCAL = "127.0.0.1"
_told: set[str] = set()  # terminal messages already printed by this server process


@functools.lru_cache(maxsize=32)
def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address (127.0.0.0/8, ::1)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    addresses = {info[4][0].split("%")[0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def exposure(address: str | None) -> str:
    """``"unset"`` (None or ``""``: Streamlit listens on all interfaces), ``"local"`` or
    ``"exposed"`` (an explicit address other machines may reach)."""
    if not address:
        return "unset"
    return "local" if is_loopback(address) else "exposed"


def exposed_warning(host: str, port: int) -> str:
    """What a user who binds to a non-loopback address must know."""
    return (f"the dashboard listens on {host}:{port}: anyone who can reach this port can read "
            "your runs and change the PSS settings of running jobs (the PSS form writes their "
            "control.json). Do this on a trusted network only; an SSH tunnel keeps it private: "
            f"ssh -L {port}:127.0.0.1:{port} <this host>, then open http://127.0.0.1:{port}")


def refusal(port: int, logdir: str) -> tuple[str, list[str], str]:
    """The page's message when Streamlit listens on every interface without being asked to:
    (why, the commands that restart it bound to this machine, how to expose it on purpose)."""
    args = ["--logdir", shlex.quote(os.path.abspath(logdir))]
    app = shlex.quote(os.path.join(os.path.dirname(os.path.abspath(__file__)), "app.py"))
    ours = " ".join(["stability-dashboard", *args, "--port", str(port)])
    theirs = " ".join(["streamlit run", app, "--server.address 127.0.0.1",
                       f"--server.port {port}", "--", *args])
    why = ("**Not shown: this dashboard listens on every network interface.** No address was "
           "set (no `--server.address`, and no config file Streamlit read says one; "
           "`dashboard/.streamlit/config.toml` is read by Streamlit 1.46 and later), so anyone "
           f"who can reach port {port} could read your runs and change the PSS settings of "
           "running jobs. Stop it (Ctrl-C) and start it bound to this machine, with either:")
    opt_in = ("To expose it on purpose (a trusted network only; an SSH tunnel is safer), pass "
              "`--host 0.0.0.0` to `stability-dashboard` or `--server.address 0.0.0.0` to "
              "`streamlit run`.")
    return why, [ours, theirs], opt_in


def _tell_once(key: str, text: str) -> None:
    """Print to the terminal that started the server, once per process (the page reruns)."""
    if key not in _told:
        _told.add(key)
        print(f"stability-monitor dashboard: {text}", file=sys.stderr, flush=True)


def guard(logdir: str) -> None:
    """First thing on the page: stop it when Streamlit listens on every interface by
    accident (saying how to restart it on ``logdir``); warn in the sidebar when it was
    exposed on purpose."""
    import streamlit as st

    address = st.get_option("server.address")
    port = int(st.get_option("server.port"))
    state = exposure(address)
    if state == "unset":
        why, commands, opt_in = refusal(port, logdir)
        _tell_once("unset", "\n    ".join([why.replace("**", ""), *commands, opt_in]))
        st.error(why)
        for command in commands:
            st.code(command, language="bash", wrap_lines=True)
        st.info(opt_in)
        st.stop()
    elif state == "exposed":
        text = exposed_warning(address, port)
        _tell_once("exposed", text)
        st.sidebar.warning(text[0].upper() + text[1:])
