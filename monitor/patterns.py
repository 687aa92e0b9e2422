"""User regular expressions on parameter names, matched without stalling the job.

A ``layers`` pattern comes from code (``MonitorConfig``, ``AlertRule``), from the live
control file (``PSSConfig``, which anyone who can write the run directory can change) or
from the dashboard's filter boxes. Python's ``re`` cannot be interrupted: ``(a+)+$`` on a
name of 40 a's and a "!" backtracks 2^40 times inside one C call, holding the GIL, and the
training process stalls for good. So patterns are matched with the ``regex`` package, whose
matcher takes a ``timeout``, under one time budget for all the names of a selection
(:data:`MATCH_TIMEOUT_S`); a pattern that runs out of it is refused with
:class:`PatternError` naming it, never half applied. Callers match once per change of the
pattern, never per step.

``regex`` compiles bounded repeats by unrolling them (``(?:a{1000}){1000}`` costs 0.5 s,
one more level minutes and gigabytes, in one C call), so before compiling, the pattern is
parsed with the standard library's parser and refused when its repeats would unroll to
more than :data:`MAX_UNROLLED` items (that also catches ``re``'s syntax errors). The syntax
is ``re``'s; ``regex`` (version 0, its default) accepts it with the same meaning.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable

import regex

try:  # the standard library's regular-expression parser (sre_parse before Python 3.11)
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

#: seconds all the names of one selection may take together (the job stalls at most this
#: long, once per change of the pattern); a sane pattern matches 10,000 names in ~10 ms
MATCH_TIMEOUT_S = 0.5
#: items a pattern may unroll to (``regex`` compiles ~2 million per second: <= 50 ms)
MAX_UNROLLED = 100_000


class PatternError(re.error):
    """A pattern refused: invalid, too large to compile, or too slow to match. A subclass of
    ``re.error``, so code that handled an invalid ``re`` pattern handles these too."""


def unrolled_size(text: str) -> int:
    """Items ``text`` unrolls to when each bounded repeat ``x{m,n}`` is written out ``n``
    times (``m`` when unbounded): the size of what ``regex`` compiles."""
    return _size(_sre_parse.parse(text))


def _size(items) -> int:
    total = 0
    for op, av in items:
        name = str(op)
        if name.endswith("REPEAT"):  # MAX_REPEAT, MIN_REPEAT, POSSESSIVE_REPEAT: (min, max, sub)
            lo, hi, sub = av
            count = lo if hi == _sre_parse.MAXREPEAT else hi
            total += max(count, 1) * _size(sub)
        elif name == "SUBPATTERN":  # (group, add_flags, del_flags, sub)
            total += _size(av[-1])
        elif name == "BRANCH":  # (None, [subs])
            total += sum(_size(sub) for sub in av[1])
        elif name in ("ASSERT", "ASSERT_NOT"):  # (direction, sub)
            total += _size(av[1])
        elif name == "ATOMIC_GROUP":
            total += _size(av)
        elif name == "GROUPREF_EXISTS":  # (group, yes, no)
            total += _size(av[1]) + (_size(av[2]) if av[2] is not None else 0)
        else:
            total += 1
        if total > MAX_UNROLLED:  # stop early: the count itself can be astronomical
            return total
    return total


def compile_pattern(text: str) -> "regex.Pattern":
    """``text`` compiled for :func:`select`; :class:`PatternError` says what is wrong."""
    if not isinstance(text, str):
        raise PatternError(f"expected a string, got {type(text).__name__}")
    try:
        size = unrolled_size(text)
        if size > MAX_UNROLLED:
            raise PatternError(f"its bounded repeats unroll to more than {MAX_UNROLLED:,} items "
                               "(nested counts such as (?:a{1000}){1000}); use * or + instead")
        return regex.compile(text)
    except PatternError:
        raise
    except (re.error, regex.error, RecursionError, OverflowError, ValueError) as err:
        raise PatternError(f"{type(err).__name__}: {err}") from None  # deep nesting: RecursionError


def problem(text: object) -> str | None:
    """Why ``text`` is refused as a pattern (:func:`compile_pattern`'s message), or None:
    the one check behind every settings class that takes a ``layers`` pattern."""
    try:
        compile_pattern(text)  # type: ignore[arg-type]
    except PatternError as err:
        return str(err)
    return None


def select(text: str, names: Iterable[str], timeout_s: float = MATCH_TIMEOUT_S) -> list[str]:
    """The ``names`` in which ``text`` matches (``re.search`` semantics), in their order.

    Raises :class:`PatternError` when it is invalid or when matching all the names takes
    more than ``timeout_s`` seconds (catastrophic backtracking); its message says why, and
    the caller names the pattern."""
    names = list(names)
    pattern = compile_pattern(text)
    deadline = time.monotonic() + timeout_s
    out = []
    for name in names:
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            found = pattern.search(name, timeout=left)
        except TimeoutError:
            raise PatternError(
                f"took more than {timeout_s:g} s to match {len(names)} "
                "names (catastrophic backtracking: nested or overlapping quantifiers such "
                "as (a+)+ or (a|aa)+); write it without them") from None
        if found is not None:
            out.append(name)
    return out


def select_or_raise(what: str, text: str, names: Iterable[str]) -> list[str]:
    """:func:`select` for a pattern passed in code (``what``: where, e.g.
    ``"MonitorConfig.layers"``): a refused pattern is a ``ValueError`` naming it."""
    try:
        return select(text, names)
    except PatternError as err:
        raise ValueError(f"{what}={text!r}: {err}") from None
