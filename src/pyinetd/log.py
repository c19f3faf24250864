"""Logging set-up: text or JSON lines to stderr (or syslog), one event per line."""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import sys
import time
from typing import Any

LOG = logging.getLogger("pyinetd")
Fields = dict[str, Any]


class TextFormatter(logging.Formatter):
    """`2026-11-25 10:48:31 pyinetd: message`; no timestamp under journald (JOURNAL_STREAM)."""

    def __init__(self, timestamps: bool) -> None:
        super().__init__()
        self._timestamps = timestamps
        self._prefix_second = -1
        self._prefix = ""
        self._pid = os.getpid()

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return self.format_event(record.levelno, msg, {}, record.created)

    def format_event(self, level: int, msg: str, fields: Fields, created: float) -> str:
        if level >= logging.WARNING:
            msg = f"{logging.getLevelName(level).lower()}: {msg}"
        if not self._timestamps:
            return msg
        second = int(created)
        if second != self._prefix_second:  # strftime once a second, not once a line
            self._prefix_second = second
            ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._prefix = f"{ts} pyinetd[{self._pid}]: "
        return self._prefix + msg


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, message and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        fields = dict(fields) if isinstance(fields, dict) else {}
        if record.exc_info:
            fields["traceback"] = self.formatException(record.exc_info)
        return self.format_event(record.levelno, record.getMessage(), fields, record.created)

    def format_event(self, level: int, msg: str, fields: Fields, created: float) -> str:
        obj: Fields = {
            "time": round(created, 6),
            "level": logging.getLevelName(level).lower(),
            "msg": msg,
        }
        obj.update(fields)
        return json.dumps(obj, default=str)


class LineHandler(logging.Handler):
    """Log lines to a file descriptor (stderr), written in batches.

    While the server's loop handles one batch of events, lines collect here and go out in one
    write when it calls ``flush()``, before it waits again: one write(2) per wake-up instead of
    one per line (two lines per connection at the default level). Outside the loop, and for
    warnings and worse, every line goes out at once.
    """

    def __init__(self, formatter: TextFormatter | JSONFormatter, fd: int = 2) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.fast = formatter
        self.fd = fd
        self.batching = False
        self._buf: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.write(self.format(record), record.levelno)

    def write(self, line: str, level: int) -> None:
        self._buf.append(line)
        if not self.batching or level >= logging.WARNING:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        self._buf.append("")
        data = "\n".join(self._buf).encode("utf-8", "backslashreplace")
        self._buf.clear()
        # Writes of whole lines up to PIPE_BUF are atomic on a pipe: several pyinetd processes
        # (workers) sharing one stderr never cut into each other's lines.
        start = 0
        while start < len(data):
            end = len(data)
            if end - start > select.PIPE_BUF:
                cut = data.rfind(b"\n", start, start + select.PIPE_BUF)
                end = cut + 1 if cut >= start else data.find(b"\n", start) + 1 or len(data)
            if not self._write_all(memoryview(data)[start:end]):
                return
            start = end

    def _write_all(self, view: memoryview) -> bool:
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except InterruptedError:
                continue
            except OSError:
                return False  # stderr closed or gone: nothing sensible to do with a log line
        return True


_LINES: LineHandler | None = None  # the fast path, when logging goes to stderr
_ARGS: list[str] = []  # the command-line options that set logging up (for worker processes)


def cli_args() -> list[str]:
    """The options that give another pyinetd process the same logging."""
    return list(_ARGS)


def flush() -> None:
    """Write out the lines collected so far (the loop calls this before it waits)."""
    if _LINES is not None:
        _LINES.flush()


def batching(on: bool) -> None:
    """Collect lines until ``flush()`` (on), or write each at once (off, flushing now)."""
    if _LINES is not None:
        _LINES.batching = on
        if not on:
            _LINES.flush()


SYSLOG_SOCKET = "/dev/log"


def _probe_unix_socket(path: str) -> None:
    """Connect to ``path`` as SysLogHandler will (datagram, else stream); OSError if neither."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(path)
    except OSError:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)


def setup_logging(level: str = "info", fmt: str = "text", syslog: bool = False) -> None:
    """Configure the pyinetd logger once, from the command line options.

    Raises OSError when ``syslog`` is asked for and the local syslog socket cannot be reached.
    """
    # Two lines per connection go through here: skip what logging computes for every record
    # and pyinetd never shows (caller's file and line, thread and process names).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    global _LINES, _ARGS
    _ARGS = ["--log-level", level, "--log-format", fmt, *(["--syslog"] if syslog else [])]
    handler: logging.Handler
    formatter: TextFormatter | JSONFormatter
    if fmt == "json":
        formatter = JSONFormatter()
    else:
        formatter = TextFormatter(timestamps=not syslog and "JOURNAL_STREAM" not in os.environ)
    _LINES = None
    if syslog:
        from logging.handlers import SysLogHandler  # only syslog users pay for it

        # The local socket only. No fallback to UDP localhost:514: datagrams nobody reads are
        # logs silently lost. SysLogHandler ignores a failed connect (it retries per record),
        # so try it once here: no daemon at start is an error the administrator sees.
        _probe_unix_socket(SYSLOG_SOCKET)
        handler = SysLogHandler(address=SYSLOG_SOCKET, facility=SysLogHandler.LOG_DAEMON)
        handler.ident = "pyinetd: "
        handler.setFormatter(formatter)
    else:
        sys.stderr.flush()
        handler = _LINES = LineHandler(formatter, sys.stderr.fileno())
    LOG.handlers[:] = [handler]
    LOG.propagate = False
    LOG.setLevel(level.upper())


def event(level: int, msg: str, **fields: Any) -> None:
    """Log one event; ``fields`` become keys of the JSON line."""
    if LOG.isEnabledFor(level):
        lines = _LINES
        if lines is not None:
            # No LogRecord: the formatter makes the line from the event itself.
            lines.write(lines.fast.format_event(level, msg, fields, time.time()), level)
        else:
            LOG.log(level, msg, extra={"fields": fields})
