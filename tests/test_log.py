"""The log's line handler: batches while the loop runs, never loses or reorders lines."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from pyinetd import log

DEADLINE = 10.0


def _read_all(fd: int) -> str:
    """Everything written to the pipe so far (it never blocks)."""
    os.set_blocking(fd, False)
    got = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            return got.decode()
        if not chunk:
            return got.decode()
        got += chunk


def test_batched_lines_wait_for_flush_and_warnings_push_everything_out() -> None:
    r, w = os.pipe()
    try:
        handler = log.LineHandler(log.TextFormatter(timestamps=False), w)
        handler.write("one", logging.INFO)  # not batching: out at once
        assert _read_all(r) == "one\n"
        handler.batching = True
        handler.write("two", logging.INFO)
        handler.write("three", logging.INFO)
        assert _read_all(r) == ""
        handler.write("warning: four", logging.WARNING)  # pushes out what is before it too
        assert _read_all(r) == "two\nthree\nwarning: four\n"
        handler.write("five", logging.INFO)
        handler.flush()
        assert _read_all(r) == "five\n"
    finally:
        os.close(r)
        os.close(w)


def test_event_and_logger_calls_share_one_ordered_stream() -> None:
    r, w = os.pipe()
    saved = log.LOG.handlers[:], log.LOG.level, log._LINES
    try:
        log.setup_logging("info", "json")
        assert log._LINES is not None
        log._LINES.fd = w
        log.batching(True)
        log.event(logging.INFO, "a: started", service="a", pid=1)
        log.LOG.info("plain %s", "record")
        log.event(logging.DEBUG, "not shown")
        log.batching(False)  # flushes
        lines = [json.loads(x) for x in _read_all(r).splitlines()]
        assert [x["msg"] for x in lines] == ["a: started", "plain record"]
        assert lines[0]["service"] == "a" and lines[0]["pid"] == 1
        assert lines[0]["level"] == "info"
    finally:
        log.LOG.handlers[:], log.LOG.level, log._LINES = saved
        os.close(r)
        os.close(w)


def test_a_closed_stderr_drops_lines_without_raising() -> None:
    r, w = os.pipe()
    os.close(r)
    try:
        handler = log.LineHandler(log.TextFormatter(timestamps=False), w)
        handler.write("into the void", logging.ERROR)  # EPIPE (SIGPIPE is ignored in Python)
    finally:
        os.close(w)


def test_a_batch_larger_than_pipe_buf_arrives_whole_and_in_order() -> None:
    """Batches go out in writes of whole lines of at most PIPE_BUF bytes (atomic on a pipe
    that worker processes share); nothing is lost, cut or reordered."""
    r, w = os.pipe()
    try:
        handler = log.LineHandler(log.TextFormatter(timestamps=False), w)
        handler.batching = True
        lines = [f"line {i} " + "x" * (i % 300) for i in range(200)]
        lines.append("y" * 10000)  # one line longer than PIPE_BUF goes out as it is
        for line in lines:
            handler.write(line, logging.INFO)
        handler.flush()
        assert _read_all(r).split("\n") == [*lines, ""]
    finally:
        os.close(r)
        os.close(w)


def test_a_full_syslog_socket_drops_lines_instead_of_blocking(tmp_path: Path) -> None:
    """/dev/log is a datagram socket: a send to a syslog daemon that stalls blocked pyinetd."""
    path = str(tmp_path / "log.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    handler = log.quiet_syslog_class()(address=path)
    handler.ident = "pyinetd: "
    handler.setFormatter(log.TextFormatter(timestamps=False))
    try:
        logger = logging.getLogger("pyinetd.test.syslog")
        logger.propagate = False
        logger.handlers[:] = [handler]
        sender = threading.Thread(
            target=lambda: [logger.warning("line %d", i) for i in range(3000)]
        )
        sender.start()
        sender.join(DEADLINE)
        assert not sender.is_alive(), "a send to a full syslog socket blocked"
        server.setblocking(False)
        got = []
        with contextlib.suppress(BlockingIOError):
            while True:
                got.append(server.recv(4096))
        assert 0 < len(got) < 3000
        logger.warning("after")  # the reader reads again: the line, then how many were lost
        assert server.recv(4096).endswith(b"pyinetd: warning: after\0")
        note = server.recv(4096)
        assert note.endswith(
            f"pyinetd: {3000 - len(got)} log lines dropped: syslog was not reading\0".encode()
        ), note
    finally:
        handler.close()
        server.close()


def test_escape_controls_leaves_text_and_tabs_and_escapes_what_a_terminal_obeys() -> None:
    assert log.escape_controls("plain text, ünïcode\tand a tab") == "plain text, ünïcode\tand a tab"
    assert (
        log.escape_controls("a\rb\nc\x1b[2J\x07\x00\x7f\x9b") == r"a\rb\nc\x1b[2J\x07\x00\x7f\x9b"
    )
    assert log.escape_controls("evil\u202etxt.exe\u2028") == r"evil\u202etxt.exe\u2028"


def test_stderr_budget_lets_a_burst_through_then_the_rate_and_counts_the_rest() -> None:
    budget = log.StderrBudget(lines_per_s=10, bytes_per_s=1000)
    budget.refill(100.0)
    assert budget.lines_left() == 10
    assert [budget.take(10) for _ in range(12)] == [True] * 10 + [False] * 2
    assert budget.lines_left() == 0
    budget.drop(5, 50)
    budget.refill(100.5)  # half a second: five more lines
    assert budget.lines_left() == 5
    budget.refill(200.0)  # a long pause refills one second's worth, no more
    assert budget.lines_left() == 10
    assert budget.take_dropped() == (7, 70)
    assert budget.take_dropped() == (0, 0)


def test_stderr_budget_bytes_spent_stop_lines_until_refilled() -> None:
    budget = log.StderrBudget(lines_per_s=100, bytes_per_s=100)
    budget.refill(0.0)
    assert budget.take(5000)  # a long line goes through while any byte is left...
    assert budget.lines_left() == 0 and not budget.take(1)  # ...and its debt holds the next
    budget.refill(10.0)
    assert not budget.take(1)  # 1000 bytes refilled: still 3900 in debt
    budget.refill(60.0)
    assert budget.take(1)


@pytest.mark.parametrize("kind", ["pipe", "socket", "terminal"])
def test_a_reader_that_stops_reading_never_blocks_the_writer(kind: str) -> None:
    """`pyinetd 2>&1 | sleep 45` froze pyinetd in write(2); journald's stream is a socket, a
    terminal stops on ^S. Lines beyond the backlog are dropped, then counted in one line."""
    if kind == "pipe":
        r, w = os.pipe()
    elif kind == "socket":
        a, b = socket.socketpair()
        r, w = a.detach(), b.detach()
    else:
        r, w = os.openpty()
    handler = log.LineHandler(log.TextFormatter(timestamps=False), w)
    lines = 20000
    try:
        handler.batching = True

        def send() -> None:
            for i in range(lines):
                handler.write(f"line {i} " + "x" * 60, logging.WARNING)

        sender = threading.Thread(target=send)
        sender.start()
        sender.join(DEADLINE)
        assert not sender.is_alive(), "a write to a stalled reader blocked"
        assert os.get_blocking(w)  # the description others share keeps its flags
        assert handler.dropped > 0 and handler.backlog()
        # the reader reads again; the loop's next turns flush
        os.set_blocking(r, False)
        got = b""
        end = time.monotonic() + DEADLINE
        while b"log lines dropped" not in got:
            assert time.monotonic() < end, got[-200:]
            with contextlib.suppress(BlockingIOError):
                got += os.read(r, 1 << 16)
            handler.flush()
        kept = got.count(b"x" * 60)
        assert f"warning: {lines - kept} log lines dropped".encode() in got
        assert not handler.backlog() and handler.dropped == 0
    finally:
        handler.close()
        os.close(r)
        os.close(w)
