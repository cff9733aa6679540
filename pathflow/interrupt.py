"""A process-wide stop request: set by a signal handler (Ctrl-C, SIGTERM) or a lost run lease,
checked by long work between units (a sub-batch, a step), so a run ends promptly as resumable."""

from __future__ import annotations

import threading

from .errors import PathflowError

_EVENT = threading.Event()
_REASON: list[str] = [""]


class Interrupted(PathflowError):
    """The run was asked to stop; what it finished is kept and it can be resumed."""


def request(reason: str) -> None:
    _REASON[0] = reason
    _EVENT.set()


def requested() -> bool:
    return _EVENT.is_set()


def reason() -> str:
    return _REASON[0]


def check() -> None:
    """Raise Interrupted if a stop was requested."""
    if _EVENT.is_set():
        raise Interrupted(_REASON[0] or "interrupted")


def sleep(seconds: float) -> None:
    """Sleep that a stop request cuts short (then raises Interrupted)."""
    _EVENT.wait(seconds)
    check()


def clear() -> None:
    _EVENT.clear()
    _REASON[0] = ""
