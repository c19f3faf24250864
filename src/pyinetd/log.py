"""Logging set-up: text or JSON lines to stderr (or syslog), one event per line."""

from __future__ import annotations

import json
import logging
import logging.handlers
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

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            msg = f"{record.levelname.lower()}: {msg}"
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        if not self._timestamps:
            return msg
        ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        return f"{ts} pyinetd[{record.process}]: {msg}"


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
    handler: logging.Handler
    if syslog:
        address = "/dev/log" if os.path.exists("/dev/log") else ("localhost", 514)
        handler = logging.handlers.SysLogHandler(
            address=address, facility=logging.handlers.SysLogHandler.LOG_DAEMON
        )
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
