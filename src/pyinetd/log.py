"""Logging set-up: text or JSON lines to stderr (or syslog), one event per line."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

LOG = logging.getLogger("pyinetd")


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
        if record.levelno >= logging.WARNING:
            msg = f"{record.levelname.lower()}: {msg}"
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        if not self._timestamps:
            return msg
        second = int(record.created)
        if second != self._prefix_second:  # strftime once a second, not once a line
            self._prefix_second = second
            ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._prefix = f"{ts} pyinetd[{self._pid}]: "
        return self._prefix + msg


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, message and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": round(record.created, 6),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            obj.update(fields)
        if record.exc_info:
            obj["traceback"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


def setup_logging(level: str = "info", fmt: str = "text", syslog: bool = False) -> None:
    """Configure the pyinetd logger once, from the command line options."""
    # Two lines per connection go through here: skip what logging computes for every record
    # and pyinetd never shows (caller's file and line, thread and process names).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler: logging.Handler
    if syslog:
        from logging.handlers import SysLogHandler  # only syslog users pay for it

        address = "/dev/log" if os.path.exists("/dev/log") else ("localhost", 514)
        handler = SysLogHandler(address=address, facility=SysLogHandler.LOG_DAEMON)
        handler.ident = "pyinetd: "
    else:
        handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(
            TextFormatter(timestamps=not syslog and "JOURNAL_STREAM" not in os.environ)
        )
    LOG.handlers[:] = [handler]
    LOG.propagate = False
    LOG.setLevel(level.upper())


def event(level: int, msg: str, **fields: Any) -> None:
    """Log one event; ``fields`` become keys of the JSON line."""
    if LOG.isEnabledFor(level):
        LOG.log(level, msg, extra={"fields": fields})
