"""How a run ended, as the job itself can tell: the state written to ``run.json``.

``running`` while the job trains; at the end ``finished`` (normal exit), ``interrupted``
(``KeyboardInterrupt``: Ctrl-C, or ``SystemExit`` with a non-zero code, e.g. a SIGTERM
handler calling ``sys.exit(143)``) or ``crashed`` (any other exception). A job that used
the monitor as a context manager reports through ``Monitor.__exit__``; one that never
closed it through an ``atexit`` handler, which sees the exception that ended the script in
``sys.last_type`` (set by the interpreter before ``atexit`` runs). A job killed outright
(SIGKILL, out of memory) writes nothing: the dashboard calls it *stale* once ``run.json``
stops changing and its ``pid`` is gone.
"""

from __future__ import annotations

import atexit
import sys
import weakref
from typing import Any, Callable


def ending_state(exc_type: type[BaseException] | None, exc: BaseException | None = None) -> str:
    """The ``run.json`` state for a job ending with ``exc_type`` (None: no exception)."""
    if exc_type is None:
        return "finished"
    if issubclass(exc_type, KeyboardInterrupt):
        return "interrupted"
    if issubclass(exc_type, SystemExit):
        code = getattr(exc, "code", None)
        return "finished" if code in (None, 0) else "interrupted"
    return "crashed"


def close_at_exit(obj: Any, close: Callable[[Any, str], None]) -> Callable[[], None]:
    """Register ``close(obj, state)`` to run at interpreter exit unless ``obj`` is gone;
    returns the handler (pass it to ``atexit.unregister`` once ``obj`` closed itself)."""
    ref = weakref.ref(obj)

    def handler() -> None:
        target = ref()
        if target is not None:
            close(target, ending_state(getattr(sys, "last_type", None),
                                       getattr(sys, "last_value", None)))

    atexit.register(handler)
    return handler
