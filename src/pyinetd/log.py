"""Logging set-up: text or JSON lines to stderr (or syslog), one event per line."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import select
import socket
import sys
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from logging.handlers import SysLogHandler

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


# Bytes of log lines kept while the reader is not reading (the environment is for the tests).
BACKLOG_MAX = int(os.environ.get("PYINETD_LOG_BACKLOG", str(256 * 1024)))


def _own_description(fd: int) -> tuple[int, socket.socket | None]:
    """A non-blocking way to write to ``fd`` that changes nothing for whoever shares it.

    `pyinetd 2>&1 | sleep 45` froze the loop in a write to a full pipe, SIGTERM included.
    O_NONBLOCK on fd 2 itself would change the file description that the shell (or the
    terminal, or our worker processes) shares with us, so a pipe, FIFO or terminal is opened
    again through /proc (a description of our own), and a socket (journald's stream) is
    written with MSG_DONTWAIT. A regular file is written as it is: it never fills up.
    """
    import stat

    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return fd, None
    if stat.S_ISSOCK(mode):
        try:
            return fd, socket.socket(fileno=os.dup(fd))
        except OSError:
            return fd, None
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        flags = os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY | os.O_APPEND
        try:
            return os.open(f"/proc/self/fd/{fd}", flags), None
        except OSError:  # no /proc: keep the shared one, as before
            return fd, None
    return fd, None


class LineHandler(logging.Handler):
    """Log lines to a file descriptor (stderr), written in batches, never blocking the loop.

    While the server's loop handles one batch of events, lines collect here and go out in one
    write when it calls ``flush()``, before it waits again: one write(2) per wake-up instead of
    one per line (two lines per connection at the default level). Outside the loop, and for
    warnings and worse, every line goes out at once.

    Writes never block (see ``_own_description``): what the reader does not take waits in a
    backlog of at most BACKLOG_MAX bytes; beyond that lines are dropped and counted, and once
    the backlog has gone out, one line says how many were dropped.
    """

    def __init__(self, formatter: TextFormatter | JSONFormatter, fd: int = 2) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.fast = formatter
        self.fd, self._sock = _own_description(fd)
        self._owned = self.fd if self.fd != fd else -1
        self.batching = False
        self._buf: list[str] = []
        self._backlog = bytearray()  # whole lines (the first maybe partly written)
        self.dropped = 0  # lines dropped since the backlog was last empty

    def emit(self, record: logging.LogRecord) -> None:
        self.write(self.format(record), record.levelno)

    def write(self, line: str, level: int) -> None:
        self._buf.append(line)
        if not self.batching or level >= logging.WARNING:
            self.flush()

    def backlog(self) -> bool:
        """True while lines wait for a reader that has stopped reading."""
        return bool(self._backlog)

    def flush(self) -> None:
        if self._buf:
            self._buf.append("")
            data = "\n".join(self._buf).encode("utf-8", "backslashreplace")
            lines = len(self._buf) - 1
            self._buf.clear()
            if self.dropped or len(self._backlog) + len(data) > BACKLOG_MAX:
                # Dropping goes on until the backlog is out, so that the count line sits
                # where the gap is.
                self.dropped += lines
            else:
                self._backlog += data
        if self._backlog:
            self._write_backlog()
        if self.dropped and not self._backlog:
            note = f"{self.dropped} log lines dropped: the log reader was not reading"
            fields = {"event": "log_dropped", "dropped": self.dropped}
            self._backlog += (
                self.fast.format_event(logging.WARNING, note, fields, time.time()) + "\n"
            ).encode()
            self.dropped = 0
            self._write_backlog()

    def flush_within(self, seconds: float) -> None:
        """Flush, then keep writing the backlog while the reader takes it, for at most
        ``seconds`` (at exit: a stalled reader delays it by that much, no more)."""
        self.flush()
        end = time.monotonic() + seconds
        poller = select.poll()
        poller.register(self._sock.fileno() if self._sock is not None else self.fd, select.POLLOUT)
        while self._backlog or self.dropped:
            left = end - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                return
            self.flush()

    def _write_backlog(self) -> None:
        # Writes of whole lines up to PIPE_BUF are atomic on a pipe: several pyinetd processes
        # (workers) sharing one stderr never cut into each other's lines; a non-blocking one
        # writes such a piece whole or not at all (pipe(7)).
        data = self._backlog
        start = 0
        while start < len(data):
            end = len(data)
            if end - start > select.PIPE_BUF:
                cut = data.rfind(b"\n", start, start + select.PIPE_BUF)
                end = cut + 1 if cut >= start else data.find(b"\n", start) + 1 or len(data)
            try:
                sent = self._send(memoryview(data)[start:end])
            except InterruptedError:
                continue
            except BlockingIOError:
                break  # the reader stalls: the rest waits for the next flush
            except OSError:
                start = len(data)  # stderr closed or gone: nothing sensible to do with a line
                break
            start += sent
        del data[:start]

    def _send(self, view: memoryview) -> int:
        if self._sock is not None:
            return self._sock.send(view, socket.MSG_DONTWAIT)
        return os.write(self.fd, view)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._owned >= 0:
            os.close(self._owned)
            self._owned = -1
        super().close()


def quiet_syslog_class() -> type[SysLogHandler]:
    """SysLogHandler, but it never blocks: a full syslog socket drops the line, counted.

    /dev/log is a datagram socket: a send blocks while the syslog daemon's queue is full.
    Defined here so that only syslog users pay for importing logging.handlers.
    """
    from logging.handlers import SysLogHandler

    class QuietSysLogHandler(SysLogHandler):
        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self.dropped = 0

        def emit(self, record: logging.LogRecord) -> None:
            prio = self.encodePriority(self.facility, self.mapPriority(record.levelname))
            line = f"<{prio}>{self.ident}{self.format(record)}\000"
            if self._send(line.encode("utf-8", "backslashreplace")) and self.dropped:
                note = f"{self.dropped} log lines dropped: syslog was not reading"
                self.dropped = 0
                self._send(f"<{prio}>{self.ident}{note}\000".encode())

        def _send(self, data: bytes) -> bool:
            sock: socket.socket = getattr(self, "socket")  # noqa: B009 - not in the stubs
            try:
                if self.unixsocket:
                    sock.send(data, socket.MSG_DONTWAIT)
                else:
                    sock.sendto(data, socket.MSG_DONTWAIT, self.address)
            except BlockingIOError:
                self.dropped += 1
                return False
            except OSError:  # syslog restarted: connect again for the next line
                self.dropped += 1
                with contextlib.suppress(OSError):
                    sock.close()
                    if self.unixsocket:
                        getattr(self, "_connect_unixsocket")(self.address)  # noqa: B009
                return False
            return True

    return QuietSysLogHandler


_LINES: LineHandler | None = None  # the fast path, when logging goes to stderr
_ARGS: list[str] = []  # the command-line options that set logging up (for worker processes)


def cli_args() -> list[str]:
    """The options that give another pyinetd process the same logging."""
    return list(_ARGS)


def flush() -> None:
    """Write out the lines collected so far (the loop calls this before it waits)."""
    if _LINES is not None:
        _LINES.flush()


def backlog() -> bool:
    """True while log lines wait for a stalled reader (the loop then wakes to retry)."""
    return _LINES is not None and _LINES.backlog()


def batching(on: bool) -> None:
    """Collect lines until ``flush()`` (on), or write each at once (off, flushing now)."""
    if _LINES is not None:
        _LINES.batching = on
        if not on:
            _LINES.flush_within(1.0)


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
    if _LINES is not None:
        _LINES.close()
    _LINES = None
    if syslog:
        SysLogHandler = quiet_syslog_class()  # only syslog users pay for logging.handlers

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


# ---------------------------------------------------------------- what services write to stderr

# Control characters in a service's stderr line would reach the log raw: `\r` or an ESC sequence
# could forge or hide log lines, or retitle the terminal of whoever reads it.
# C0 (but tab), DEL, C1, the Unicode line and paragraph separators and the bidi overrides
# (CVE-2021-42574, "Trojan Source") are written as escapes.
_ESCAPES: dict[int, str] = {
    c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c != 0x09
}
_ESCAPES.update({0x0A: "\\n", 0x0D: "\\r"})
_ESCAPES.update(
    {c: f"\\u{c:04x}" for c in (0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A))}
)


def escape_controls(text: str) -> str:
    """``text`` with control characters written as ``\\x1b``, ``\\r``... (see _ESCAPES)."""
    return text.translate(_ESCAPES)


class StderrBudget:
    """How much of one service's stderr is logged: lines and bytes per second, with a burst of
    one second's worth, lazily refilled; what is over is dropped and counted (one
    connection writing 300 MB to stderr would otherwise make 3 million log lines).

    Time in, decision out: ``take(now, nbytes)`` says whether one line of ``nbytes`` may be
    logged. A line is let through while any byte is left (the debt delays the next ones), so
    that a long line is not dropped for ever by a small byte rate.
    """

    def __init__(self, lines_per_s: float, bytes_per_s: float) -> None:
        self.lines_per_s = lines_per_s
        self.bytes_per_s = bytes_per_s
        self._lines = max(1.0, lines_per_s)
        self._bytes = max(1.0, bytes_per_s)
        self._last: float | None = None
        self.dropped_lines = 0
        self.dropped_bytes = 0
        # Since the service's first child, for status and metrics (never reset).
        self.total_dropped_lines = 0
        self.total_dropped_bytes = 0

    def set_rate(self, lines_per_s: float, bytes_per_s: float) -> None:
        """Follow a reload (what is in the bucket stays, within the new burst)."""
        self.lines_per_s, self.bytes_per_s = lines_per_s, bytes_per_s
        self._lines = min(self._lines, max(1.0, lines_per_s))
        self._bytes = min(self._bytes, max(1.0, bytes_per_s))

    def refill(self, now: float) -> None:
        if self._last is not None and now > self._last:
            elapsed = now - self._last
            self._lines = min(max(1.0, self.lines_per_s), self._lines + elapsed * self.lines_per_s)
            self._bytes = min(max(1.0, self.bytes_per_s), self._bytes + elapsed * self.bytes_per_s)
        self._last = now  # a clock step back refills nothing and becomes the reference

    def lines_left(self) -> int:
        """Whole lines that may be logged now (0 when the bytes are spent)."""
        return int(self._lines) if self._bytes > 0 else 0

    def take(self, nbytes: int) -> bool:
        """Log one line of ``nbytes``? (Call ``refill`` first.) Counts it as dropped if not."""
        if self._lines >= 1.0 and self._bytes > 0:
            self._lines -= 1.0
            self._bytes -= nbytes
            return True
        self.drop(1, nbytes)
        return False

    def drop(self, lines: int, nbytes: int) -> None:
        self.dropped_lines += lines
        self.dropped_bytes += nbytes
        self.total_dropped_lines += lines
        self.total_dropped_bytes += nbytes

    def take_dropped(self) -> tuple[int, int]:
        """(lines, bytes) dropped since the last call."""
        out = (self.dropped_lines, self.dropped_bytes)
        self.dropped_lines = self.dropped_bytes = 0
        return out


# ---------------------------------------------------------------- log throttling


class _Seen:
    """What a LogLimiter remembers about one key."""

    __slots__ = ("logged_at", "suppressed")

    def __init__(self, logged_at: float) -> None:
        self.logged_at = logged_at
        self.suppressed = 0


class LogLimiter:
    """Log a repeated event (a denied peer) at most once per key per `interval` seconds, and
    at most `max_lines` events in all per interval.

    The per-key memory is bounded (`max_keys`, least recently seen evicted), so sources that
    rotate through more addresses than that are each new again: 5,000 rotating sources gave
    15,000 "refused" lines. `max_lines` bounds what any flood can log;
    the events it holds back are counted, for ``take_overflow()`` to report. The server keeps
    one LogLimiter per service, so that one service's flood evicts no other's keys.
    """

    def __init__(
        self, interval: float = 60.0, max_keys: int = 4096, max_lines: int | None = None
    ) -> None:
        if not (math.isfinite(interval) and interval >= 0):
            raise ValueError(f"{interval!r}: interval must be a number >= 0")
        if max_keys < 1:
            raise ValueError(f"{max_keys!r}: max_keys must be >= 1")
        if max_lines is not None and max_lines < 1:
            raise ValueError(f"{max_lines!r}: max_lines must be >= 1")
        self.interval = float(interval)
        self.max_keys = max_keys
        self.max_lines = max_lines
        self._seen: OrderedDict[str, _Seen] = OrderedDict()  # least recently seen first
        self._window = -math.inf  # when the current interval of max_lines began
        self._lines = 0  # events logged in it
        self._overflow = 0  # events of new keys held back by max_lines, not yet reported

    def __len__(self) -> int:
        return len(self._seen)

    def _room(self, now: float) -> bool:
        """One more line fits in this interval's max_lines (and is counted)."""
        if self.max_lines is None:
            return True
        if not self._window <= now < self._window + self.interval:
            self._window, self._lines = now, 0  # a new interval (or the clock stepped back)
        if self._lines >= self.max_lines:
            return False
        self._lines += 1
        return True

    def should_log(self, key: str, now: float) -> tuple[bool, int]:
        """(log this one?, events suppressed for `key` since its last logged one)."""
        seen = self._seen.get(key)
        if seen is None:
            if not self._room(now):
                self._overflow += 1
                return False, 0
            self._seen[key] = _Seen(now)
            # Bounded memory: a flood from ever-new addresses evicts the least recently seen key,
            # which at worst gets logged once more if it comes back (max_lines bounds that).
            if len(self._seen) > self.max_keys:
                self._seen.popitem(last=False)
            return True, 0
        self._seen.move_to_end(key)
        if now - seen.logged_at >= self.interval and self._room(now):
            suppressed, seen.logged_at, seen.suppressed = seen.suppressed, now, 0
            return True, suppressed
        if now < seen.logged_at:
            # The clock stepped back: restart the interval from here rather than stay silent until
            # the old time comes round again. Still suppressed, so this cannot flood either.
            seen.logged_at = now
        seen.suppressed += 1
        return False, seen.suppressed

    def take_overflow(self) -> int:
        """Events of new keys that max_lines held back since the last call."""
        out, self._overflow = self._overflow, 0
        return out


# Throttled events (refusals, spawn errors) logged per service a minute at most, whatever the
# number of sources: beyond, they are counted and the count logged with the next one.
THROTTLED_LINES = 100


class ThrottledLog:
    """Refusals and start errors: one LogLimiter per service, so that one service's flood
    resets no other's keys, and one for events of no service."""

    def __init__(self) -> None:
        self._refusals = LogLimiter(60.0, max_lines=THROTTLED_LINES)  # events of no service
        self._limiters: dict[str, LogLimiter] = {}  # per service

    def __call__(self, key: str, level: int, msg: str, **fields: object) -> None:
        """Log an event at most once a minute per ``key``, saying how many were suppressed,
        and at most THROTTLED_LINES such events a minute per service."""
        service = str(fields.get("service", ""))
        limiter = self._limiters.get(service) if service else self._refusals
        if limiter is None:
            limiter = self._limiters[service] = LogLimiter(60.0, max_lines=THROTTLED_LINES)
        show, suppressed = limiter.should_log(key, time.monotonic())
        if show:
            held = limiter.take_overflow()
            if held:
                event(
                    level,
                    f"{service or 'pyinetd'}: {held} more refusals or errors not logged: "
                    f"over {THROTTLED_LINES} a minute",
                    event="log_overflow",
                    service=service,
                    suppressed=held,
                )
            more = f" ({suppressed} more since last logged)" if suppressed else ""
            event(level, msg + more, suppressed=suppressed, **fields)
