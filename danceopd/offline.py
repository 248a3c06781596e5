"""What validation may leave unchecked when a command needs only the models.

`danceopd plan` runs on a head node or a laptop that holds the recipe but not its data folders or LoRA files. Within
`models_only()`, a validator that would refuse a missing data file or adapter notes it instead (`skipped`), and the
command says what it could not check; everywhere else they are refused as before.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

_NOTES: ContextVar[list[str] | None] = ContextVar("danceopd_unchecked", default=None)


@contextlib.contextmanager
def models_only():
    """Within the block, missing data and adapter files are noted, not refused; yields the list of notes."""
    notes: list[str] = []
    token = _NOTES.set(notes)
    try:
        yield notes
    finally:
        _NOTES.reset(token)


def skipped(what: str) -> bool:
    """Inside models_only(): note `what` (a file that is not here, left unchecked) and return True; else False (refuse it)."""
    notes = _NOTES.get()
    if notes is None:
        return False
    if what not in notes:
        notes.append(what)
    return True


def active() -> bool:
    return _NOTES.get() is not None
