"""The signal lists, in one home (no imports beyond the standard library: the exit watcher
process imports it too)."""

from __future__ import annotations

import signal

# What pyinetd catches (through the loop's wake-up fd): a process pyinetd forks without exec
# (a relay) resets them to their default, and the exit watcher ignores those a terminal sends
# to the whole group.
HANDLED_SIGNALS = (
    signal.SIGCHLD,
    signal.SIGHUP,
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
# What CPython ignores at start-up: every process pyinetd starts gets them back at their
# default (spawn.py), or ``yes | head`` in a shell service would spin on EPIPE instead of dying.
PYTHON_IGNORED = (signal.SIGPIPE, signal.SIGXFSZ)


def _dispositions() -> list[tuple[int, object]]:
    """(signal, getsignal()) for every signal whose disposition can be changed here."""
    out: list[tuple[int, object]] = []
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            out.append((sig, signal.getsignal(sig)))
        except (OSError, ValueError):
            continue
    return out


def ignored_signals() -> tuple[signal.Signals, ...]:
    """Signals ignored in this process; the child must get them back at their default.

    CPython ignores SIGPIPE and SIGXFSZ at start-up; a service must not inherit that, or
    ``yes | head`` in a shell service would spin on EPIPE instead of dying.
    """
    return tuple(
        sig
        for sig, how in _dispositions()
        if isinstance(sig, signal.Signals) and how == signal.SIG_IGN
    )


def handled_signals() -> tuple[int, ...]:
    """Signals whose disposition here is not the default: a handler, ignored, or set
    outside Python (getsignal() says None). pyinetd's own child (_spawn.c) resets
    exactly these to their default."""
    return tuple(int(sig) for sig, how in _dispositions() if how != signal.SIG_DFL)
