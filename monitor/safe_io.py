"""Reading files that anyone could have put in a run directory, without trusting them.

The training job reads ``control.json`` and the dashboard reads ``run.json``, ``control.json``
and event files from directories that other people and programs write into. A careless or
hostile file must give a clear message, never an exception that stops the job, a read that
blocks forever or a read that fills the memory. So:

- only regular files are opened: a FIFO would block the reader until someone writes into
  it, a device (``/dev/zero``) never ends, a directory cannot be read. The file is checked
  with ``stat`` before opening (opening some devices has side effects), opened with
  ``O_NONBLOCK`` and checked again with ``fstat`` (it could have been swapped in between);
- ``follow_symlinks=False`` refuses a symbolic link (``O_NOFOLLOW`` closes the race);
- small files have a size cap, checked on the open file before reading, and the read stops
  at the cap whatever the size claimed;
- text must be UTF-8 (a UTF-8 byte-order mark is accepted); UTF-16 and UTF-32 are named by
  their byte-order mark, as Windows PowerShell's ``>`` writes UTF-16;
- JSON nesting is bounded before parsing (Python's parser recurses, so ``[[[[...`` deep
  enough raises RecursionError).

Only the standard library is imported: the dashboard uses this module without torch.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
from typing import Any

#: JSON nesting accepted by :func:`load_json` (the files read here nest 2-4 levels)
MAX_JSON_DEPTH = 64

_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32-LE"), (b"\x00\x00\xfe\xff", "UTF-32-BE"),
         (b"\xff\xfe", "UTF-16-LE"), (b"\xfe\xff", "UTF-16-BE"))
_UTF8_BOM = b"\xef\xbb\xbf"
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


class RefusedFile(ValueError):
    """A file was not read (not a regular file, too large, not UTF-8, too deep, not JSON).

    The message names the file, what is wrong with it and how to fix it.
    """


def file_kind(mode: int) -> str:
    """A reader's name for the file type in ``mode`` (from ``os.stat``)."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def _refuse_kind(path: str, mode: int) -> RefusedFile:
    return RefusedFile(f"{path} is {file_kind(mode)}, not a regular file: it was not read "
                       "(replace it by a regular file, or remove it)")


def open_regular(path: str, *, follow_symlinks: bool = True) -> tuple[int, os.stat_result]:
    """Open a regular file read-only without blocking; returns ``(fd, fstat)``.

    Raises FileNotFoundError when absent (callers often treat that as "no file"), and
    :class:`RefusedFile` for anything that is not a regular file or cannot be opened.
    """
    try:
        before = os.stat(path, follow_symlinks=follow_symlinks)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise RefusedFile(f"cannot read {path}: {err.strerror or err}") from None
    if stat.S_ISLNK(before.st_mode):
        target = _link_target(path)
        raise RefusedFile(f"{path} is a symbolic link (to {target!r}); only a regular file "
                          "is read here: replace the link by a copy of the file")
    if not stat.S_ISREG(before.st_mode):
        raise _refuse_kind(path, before.st_mode)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise RefusedFile(f"cannot read {path}: {err.strerror or err}") from None
    after = os.fstat(fd)
    if not stat.S_ISREG(after.st_mode):  # swapped between stat and open
        os.close(fd)
        raise _refuse_kind(path, after.st_mode)
    return fd, after


def _link_target(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def read_bytes(path: str, max_bytes: int, *, follow_symlinks: bool = True) -> bytes:
    """The content of a regular file of at most ``max_bytes`` bytes (see module docstring)."""
    fd, st = open_regular(path, follow_symlinks=follow_symlinks)
    try:
        if st.st_size > max_bytes:
            raise RefusedFile(f"{path} is {st.st_size:,} bytes, more than the {max_bytes:,} "
                              "accepted here: it was not read (is it the right file?)")
        chunks, size = [], 0
        while size <= max_bytes:
            chunk = os.read(fd, max_bytes + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as err:
        raise RefusedFile(f"cannot read {path}: {err.strerror or err}") from None
    finally:
        os.close(fd)
    if size > max_bytes:  # it grew after fstat
        raise RefusedFile(f"{path} grew beyond {max_bytes:,} bytes while being read")
    return b"".join(chunks)


def decode_text(data: bytes, path: str) -> str:
    """UTF-8 text of ``data`` (a leading UTF-8 byte-order mark is dropped)."""
    for bom, name in _BOMS:
        if data.startswith(bom):
            raise RefusedFile(f"{path} is {name} text (byte-order mark {bom.hex(' ').upper()}), "
                              "as Windows PowerShell's `>` writes; save it as UTF-8 (PowerShell: "
                              "`Set-Content -Encoding utf8`, or write it with Python)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise RefusedFile(f"{path} is not UTF-8 text (byte 0x{data[err.start]:02X} at offset "
                          f"{err.start}); save it as UTF-8") from None


def json_depth(text: str) -> int:
    """How deep arrays and objects nest in JSON ``text`` (brackets inside strings ignored)."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    depth = deepest = 0
    for ch in brackets:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def parse_json(text: str, path: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(text)`` with nesting bounded; :class:`RefusedFile` when not JSON."""
    depth = json_depth(text)
    if depth > max_depth:
        raise RefusedFile(f"{path} nests {depth} levels deep, more than the {max_depth} "
                          "accepted here: it was not parsed")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, or an integer too long
        raise RefusedFile(f"{path} is not valid JSON: {err}") from None


def load_json(path: str, max_bytes: int, *, follow_symlinks: bool = True,
              max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Read, decode and parse a small JSON file safely (FileNotFoundError when absent)."""
    text = decode_text(read_bytes(path, max_bytes, follow_symlinks=follow_symlinks), path)
    return parse_json(text, path, max_depth)


def write_text_atomic(path: str, text: str, *, fsync: bool = True, mode: int | None = None
                      ) -> None:
    """Replace ``path`` by a regular file holding ``text``, atomically (temp file + rename).

    The temporary file gets a fresh name (``mkstemp``, created exclusively), so a FIFO or a
    symbolic link planted at a fixed temporary name can neither block the writer nor
    redirect the write; the rename replaces whatever entry ``path`` was (a link, a FIFO),
    except a directory (IsADirectoryError). ``fsync=False`` skips the flush to disk (a file
    rewritten at every logged step, where a lost update costs nothing). The file is private
    to its owner (``mkstemp``'s 0o600) unless ``mode`` says otherwise.
    """
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".tmp", dir=folder or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            fh.write(text)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
