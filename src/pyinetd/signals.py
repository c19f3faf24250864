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
)
# What CPython ignores at start-up: every process pyinetd starts gets them back at their
# default (spawn.py), or ``yes | head`` in a shell service would spin on EPIPE instead of dying.
PYTHON_IGNORED = (signal.SIGPIPE, signal.SIGXFSZ)
