"""The job's side of the live control file (SPEC 3, "Live control").

``ControlWatcher.poll(step)`` costs one ``os.lstat`` every ``check_every`` steps; only
when the file's identity (mtime, size, inode) changed is it read and validated through
``monitor.schema`` (the schema both sides import). An invalid file never raises: the
previous settings stay and the rejection comes back with its reason, once per change of
the file. What is refused: anything but a regular file (a FIFO would block the job, a
device never ends), a symbolic link, a file over ``schema.MAX_CONTROL_BYTES`` (refused
unread), text that is not UTF-8, JSON nested too deep, out-of-range values.

The file is the source of truth: a valid file whose version or settings differ from those
applied last is applied, also when its version is lower (the file was deleted and written
again from version 1); the update says so in ``note``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from monitor.schema import ControlError, ControlFile, PSSConfig, control_path, read_control


@dataclass(frozen=True)
class ControlUpdate:
    """What a poll found: new settings to apply, a one-shot request, or a rejection."""

    version: int | None = None  # the applied version (None when nothing new was applied)
    settings: PSSConfig | None = None
    smooth_now: bool = False
    rejected: str | None = None  # reason the file was refused
    note: str | None = None  # why an unusual version was applied (lower, or the same)


class ControlWatcher:
    """Watches ``<logdir>/control.json`` for new versions.

    Args:
        logdir: the run directory.
        check_every: steps between two ``os.stat`` calls.
        version: the version already in force.
        settings: the settings in force under that version (None: unknown).
    """

    def __init__(self, logdir: str, check_every: int = 5, version: int = 0,
                 smooth_now_seen: int = 0, settings: PSSConfig | None = None) -> None:
        if not (isinstance(check_every, int) and check_every >= 1):
            raise ValueError(f"ControlWatcher(check_every={check_every!r}): expected an integer >= 1")
        self.path = control_path(logdir)
        self.logdir = logdir
        self.check_every = check_every
        self.version = version
        self.smooth_now_seen = smooth_now_seen
        self.settings = settings
        self._signature: tuple[int, int, int] | None = None

    def poll(self, step: int) -> ControlUpdate | None:
        """Check the file (every ``check_every`` steps); None when there is nothing new."""
        if step % self.check_every != 0:
            return None
        return self.check()

    def check(self) -> ControlUpdate | None:
        """Check the file now; None when it is absent or unchanged since the last check."""
        try:
            st = os.lstat(self.path)  # a symbolic link's own identity: it is refused anyway
        except FileNotFoundError:
            return None
        except OSError as err:
            return ControlUpdate(rejected=f"cannot stat {self.path}: {err}")
        signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        if signature == self._signature:
            return None
        self._signature = signature
        try:
            content = read_control(self.logdir)
        except ControlError as err:
            return ControlUpdate(rejected=str(err))
        except Exception as err:  # never raise into the job, whatever the file holds
            return ControlUpdate(rejected=f"cannot read {self.path}: {err!r}")
        return self._accept(content) if content is not None else None

    def _accept(self, content: ControlFile) -> ControlUpdate | None:
        restarted = content.version < self.version  # written anew: its request ids too
        smooth_now = content.smooth_now > 0 and (content.smooth_now != self.smooth_now_seen
                                                 or restarted)
        self.smooth_now_seen = content.smooth_now
        new = (content.version, content.settings) != (self.version, self.settings)
        if not new and not smooth_now:
            return None  # the same content written again (or touched)
        note = None
        if new and restarted:
            note = (f"version {content.version} is lower than {self.version}, applied last: "
                    "control.json was written anew, its versions start again")
        elif new and content.version == self.version:
            note = f"version {content.version} again, with other settings (two writers?)"
        if new:
            self.version, self.settings = content.version, content.settings
        return ControlUpdate(version=content.version if new else None,
                             settings=content.settings if new else None, smooth_now=smooth_now,
                             note=note)
