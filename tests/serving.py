"""Helpers for tests that start a real dashboard server: a free port, its health, and the
addresses it listens on (read from the kernel, not from what the server says)."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import time
import urllib.request

PROC_TCP = ("/proc/net/tcp", "/proc/net/tcp6")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(port: int, proc: subprocess.Popen, log_path: str,
                 timeout: float = 60.0) -> None:
    """Until ``/_stcore/health`` on 127.0.0.1:``port`` answers ok; raises with the log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{read(log_path)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health",
                                        timeout=2) as resp:
                if resp.read() == b"ok":
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"no health answer on port {port} within {timeout} s:\n{read(log_path)}")


def read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.read()


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets in LISTEN state on ``port`` (Linux /proc/net)."""
    found = set()
    for name in PROC_TCP:
        with open(name) as fh:
            rows = fh.read().splitlines()[1:]
        for row in rows:
            fields = row.split()
            address, port_hex = fields[1].split(":")
            if fields[3] != "0A" or int(port_hex, 16) != port:  # 0A: TCP_LISTEN
                continue
            raw = bytes.fromhex(address)
            if sys.byteorder == "little":  # each 32-bit word is in host byte order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(str(ipaddress.ip_address(raw)))
    return found


def has_proc_net() -> bool:
    return all(os.path.exists(name) for name in PROC_TCP)


def outward_address() -> str | None:
    """This machine's address towards the network (no packet is sent), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1: routing decides the local address
            address = sock.getsockname()[0]
    except OSError:
        return None
    return None if ipaddress.ip_address(address).is_loopback else address


def assert_local_only(port: int) -> None:
    """The server on ``port`` listens on 127.0.0.1 and nowhere else."""
    if has_proc_net():
        assert listening_addresses(port) == {"127.0.0.1"}, listening_addresses(port)
    outward = outward_address()
    if outward is not None:  # reaching it by the machine's network address must fail
        try:
            socket.create_connection((outward, port), timeout=3).close()
        except OSError:
            pass
        else:
            raise AssertionError(f"port {port} answers on {outward}, not only on 127.0.0.1")


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM by process id, then SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
