"""`workers: N`: the other accept loops, each a fresh pyinetd serving our listening sockets.

The first process starts them (spawn.start_python), restarts one that dies, retires those
past the configured number at a reload, and passes its signals on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable

from pyinetd import log
from pyinetd.config import Config
from pyinetd.log import event
from pyinetd.runtime.loop import Loop
from pyinetd.runtime.services import Services, worker_serves
from pyinetd.signals import ignored_signals
from pyinetd.spawn import start_python


class Workers:
    """The first process's workers: pid -> worker number."""

    def __init__(
        self,
        *,
        loop: Loop,
        services: Services,
        track: Callable[[int], None],
        drained: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._services = services
        self._track = track  # a worker is reaped like a child
        self._drained = drained  # a worker ended while stopping
        self.table: dict[int, int] = {}

    @property
    def _config(self) -> Config:
        return self._services.config

    def start(self) -> None:
        """Start the configured workers not running yet."""
        for number in range(1, self._config.workers):
            if number not in self.table.values():
                self._spawn(number)

    def _spawn(self, number: int) -> None:
        """Start worker ``number``: a fresh `pyinetd -c CONFIG` that adopts our listening
        sockets (their fd numbers in PYINETD_LISTEN_FDS) and serves them with its own loop."""
        socks = [
            lst.sock
            for lst in self._services.listeners.values()
            if worker_serves(lst.service, lst.key)
        ]
        env = dict(os.environ)
        env.update(
            PYINETD_WORKER=str(number),
            PYINETD_LISTEN_FDS=",".join(str(s.fileno()) for s in socks),
        )
        env.pop("NOTIFY_SOCKET", None)
        args = ["-c", str(self._config.path), *log.cli_args()]
        for sock in socks:
            os.set_inheritable(sock.fileno(), True)
        try:
            statement = "from pyinetd.cli import main; sys.exit(main())"
            pid = start_python(statement, args, env, sigdef=ignored_signals())
        except OSError as exc:
            event(logging.ERROR, f"worker {number}: cannot start: {exc}", event="worker_error")
            return
        finally:
            for sock in socks:
                os.set_inheritable(sock.fileno(), False)
        self.table[pid] = number
        self._track(pid)
        event(logging.INFO, f"worker {number}: pid {pid}", event="worker_start", pid=pid)

    def reload(self) -> None:
        """After our reload: workers beyond the new number retire, the others reload."""
        self.signal(signal.SIGHUP, retire=signal.SIGTERM)
        self.start()

    def signal(self, sig: int, retire: int | None = None) -> None:
        """Send ``sig`` to every worker (``retire`` instead to those numbered past the
        configured count)."""
        for pid, number in list(self.table.items()):
            send = retire if retire is not None and number >= self._config.workers else sig
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, send)

    def exited(self, pid: int, status: int) -> bool:
        """A pid was reaped: True if it was a worker (then restarted unless retired)."""
        number = self.table.pop(pid, None)
        if number is None:
            return False
        code = os.waitstatus_to_exitcode(status)
        if self._services.stopping:
            self._drained()
            return True
        if number >= self._config.workers:
            return True  # retired by a reload
        event(
            logging.ERROR,
            f"worker {number} (pid {pid}) exited ({code}); starting it again in 1s",
            event="worker_exit",
            pid=pid,
        )
        self._loop.call_later(1.0, self._restart)
        return True

    def _restart(self) -> None:
        if not self._services.stopping:
            self.start()
