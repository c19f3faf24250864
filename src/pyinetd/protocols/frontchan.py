"""The channel between pyinetd and a service's front process: its messages and their checks.

One ``socketpair(AF_UNIX, SOCK_SEQPACKET)`` per front; one record is one message: an ASCII kind
letter, then a JSON object (UTF-8), with up to ``MAX_FDS`` fds as SCM_RIGHTS. The front parses
what strangers send (TLS records, HTTP requests), so the parent reads every message it sends as
untrusted: ``decode`` accepts only a known kind with exactly its keys, each of its type and within
its bounds, and exactly the fds the kind carries; anything else is a ``ChannelError`` (the parent
then kills and replaces the front, the front exits). Pure: the standard library only.

Parent -> front: ``C`` a connection (the client socket), ``S`` the program started (its stdin's
write end, its stdout's read end), ``N`` it could not start, ``X`` it exited, ``K`` abort a
connection, ``D`` no more connections. Front -> parent: ``H`` handshake done (the environment it
adds), ``F`` failed, ``E`` over (bytes carried each way). FRONT-API.md has the whole protocol.
"""

from __future__ import annotations

import array
import contextlib
import json
import math
import os
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from typing import Any, NamedTuple

__all__ = [
    "FDS",
    "FRONT_TO_PARENT",
    "MAX_ENV",
    "MAX_FDS",
    "MAX_ID",
    "MAX_MESSAGE",
    "PARENT_TO_FRONT",
    "TLS_ENV",
    "ChannelError",
    "FdsLost",
    "Message",
    "close_fds",
    "decode",
    "encode",
    "recv",
    "send",
]

MAX_MESSAGE = 8192  # bytes per record, kind letter included
MAX_FDS = 2  # fds per record (the most any kind carries)
MAX_ID = 2**53  # ids are 1..MAX_ID: exact in every JSON reader (IEEE 754 doubles)
MAX_BYTES = 2**63 - 1  # a byte count
MAX_STR = 256  # characters in a string field unless its key says otherwise
MAX_TEXT = 4096  # characters in an environment value or a refusal's body
MAX_ENV = 64  # variables in one ``H``
MAX_DEADLINE = 3600.0  # seconds: a handshake's deadline, (0, MAX_DEADLINE]

PARENT_TO_FRONT = frozenset("CSNXKD")
FRONT_TO_PARENT = frozenset("HFE")

# The fds each kind carries: C the client socket; S the program's stdin (write end) and stdout
# (read end).
FDS: Mapping[str, int] = {"C": 1, "S": 2, "N": 0, "X": 0, "K": 0, "D": 0, "H": 0, "F": 0, "E": 0}

# The variables a TLS front may report in ``H`` (tlsconf.tls_environ's names); the parent keeps
# only the names its service's kind of front produces.
TLS_ENV = frozenset(
    {
        "SSL_PROTOCOL",
        "SSL_CIPHER",
        "SSL_CIPHER_USEKEYSIZE",
        "SSL_TLS_SNI_SERVERNAME",
        "SSL_TLS_SNI",
        "SSL_CLIENT_VERIFY",
        "SSL_CLIENT_S_DN",
        "SSL_CLIENT_I_DN",
    }
)

# An environment variable's name: what POSIX shells accept, upper case, bounded.
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,63}")
# C0 controls, DEL, C1 controls; lone surrogates (JSON's "\ud800" escapes) cannot be encoded.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# A body may hold lines: tab, CR and LF pass, every other control does not.
_BODY_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


class ChannelError(ValueError):
    """A record that breaks the channel's protocol: the peer is no longer trusted."""


class FdsLost(ChannelError):
    """A well-formed record whose fds the kernel could not hand over (MSG_CTRUNC: the
    receiver is at its RLIMIT_NOFILE, EMFILE; or more fds than the room given). ``message``
    has ``fds=()``; a front answers its ``C`` or ``S`` with ``F`` instead of trusting less.
    A parent, which is never sent fds, treats it as any ChannelError."""

    def __init__(self, why: str, message: Message) -> None:
        super().__init__(why)
        self.message = message


class Message(NamedTuple):
    """One decoded record. ``fds`` are the caller's to close (exactly ``FDS[kind]`` of them)."""

    kind: str
    fields: dict[str, Any]
    fds: tuple[int, ...]


# --- value checks: each returns the value or raises ChannelError naming the key --------------


def _int(key: str, v: object, lo: int, hi: int) -> int:
    # bool is an int subclass: true/false are not numbers here.
    if type(v) is not int or not lo <= v <= hi:
        raise ChannelError(f"{key}: expected an integer in {lo}..{hi}, got {_show(v)}")
    return v


def _opt_int(key: str, v: object, lo: int, hi: int) -> int | None:
    return None if v is None else _int(key, v, lo, hi)


def _str(key: str, v: object, limit: int = MAX_STR, control: re.Pattern[str] = _CONTROL) -> str:
    if type(v) is not str:
        raise ChannelError(f"{key}: expected a string, got {_show(v)}")
    if len(v) > limit:
        raise ChannelError(f"{key}: longer than {limit} characters")
    if control.search(v):
        raise ChannelError(f"{key}: holds a NUL or control character")
    return v


def _id(key: str, v: object) -> int:
    return _int(key, v, 1, MAX_ID)


def _address(key: str, v: object) -> list[Any]:
    if type(v) is not list or len(v) != 2:
        raise ChannelError(f"{key}: expected [address, port], got {_show(v)}")
    _str(f"{key}[0]", v[0], 128)
    _int(f"{key}[1]", v[1], 0, 65535)
    return v


def _opt_address(key: str, v: object) -> list[Any] | None:
    return None if v is None else _address(key, v)


def _deadline(key: str, v: object) -> float:
    if type(v) not in (int, float):
        raise ChannelError(f"{key}: expected seconds, got {_show(v)}")
    assert isinstance(v, int | float)
    if not (math.isfinite(v) and 0 < v <= MAX_DEADLINE):
        raise ChannelError(f"{key}: expected seconds in (0, {MAX_DEADLINE:g}], got {v!r}")
    return float(v)


def _refuse(key: str, v: object) -> dict[str, Any] | None:
    if v is None:
        return None
    obj = _object(key, v, {"status", "reason", "body"})
    _int(f"{key}.status", obj["status"], 100, 599)
    _str(f"{key}.reason", obj["reason"])
    _str(f"{key}.body", obj["body"], MAX_TEXT, _BODY_CONTROL)
    return obj


def _env(key: str, v: object) -> dict[str, str]:
    if type(v) is not dict:
        raise ChannelError(f"{key}: expected an object, got {_show(v)}")
    if len(v) > MAX_ENV:
        raise ChannelError(f"{key}: more than {MAX_ENV} variables")
    for name, value in v.items():
        if not _ENV_NAME.fullmatch(name):
            raise ChannelError(f"{key}: {name[:70]!a} is not a variable name")
        _str(f"{key}.{name}", value, MAX_TEXT)
    return v


def _bytes(key: str, v: object) -> int:
    return _int(key, v, 0, MAX_BYTES)


def _code(key: str, v: object) -> int | None:
    return _opt_int(key, v, 0, 255)


def _signal(key: str, v: object) -> int | None:
    return _opt_int(key, v, 1, 127)


def _reason(key: str, v: object) -> str:
    return _str(key, v)


_Check = Callable[[str, object], object]

# Each kind's keys, exactly, with their checks.
SCHEMAS: Mapping[str, Mapping[str, _Check]] = {
    "C": {
        "id": _id,
        "peer": _address,
        "local": _opt_address,
        "deadline": _deadline,
        "refuse": _refuse,
    },
    "S": {"id": _id},
    "N": {"id": _id, "reason": _reason},
    "X": {"id": _id, "code": _code, "signal": _signal},
    "K": {"id": _id},
    "D": {},
    "H": {"id": _id, "env": _env},
    "F": {"id": _id, "reason": _reason},
    "E": {"id": _id, "bytes_in": _bytes, "bytes_out": _bytes},
}


def _show(v: object) -> str:
    text = json.dumps(v) if isinstance(v, str | int | float | bool | None) else type(v).__name__
    return text[:40]


def _object(key: str, v: object, keys: AbstractSet[str]) -> dict[str, Any]:
    if type(v) is not dict:
        raise ChannelError(f"{key}: expected an object, got {_show(v)}")
    if v.keys() != keys:
        missing = sorted(keys - v.keys())
        extra = sorted(str(k)[:40] for k in v.keys() - keys)
        raise ChannelError(f"{key}: missing {missing}, unexpected {extra}")
    return v


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ChannelError("a key given twice")
    return obj


def _no_constant(name: str) -> None:
    raise ChannelError(f"{name} is not a number")


# --- encode / decode ---------------------------------------------------------------------------


def encode(kind: str, fields: Mapping[str, object] | None = None) -> bytes:
    """The record for ``kind`` with ``fields``; ChannelError if they do not fit the schema
    (checked as the receiver will: a bad message is caught where it is made)."""
    data = kind.encode("ascii", errors="replace") + json.dumps(
        dict(fields or {}), separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")
    _check(kind, data, len(data))
    return data


def decode(expected: Iterable[str], data: bytes, fds: Iterable[int] = ()) -> Message:
    """The message in one record (``data``, the ``fds`` it carried) if its kind is one of
    ``expected`` and it fits that kind's schema; else ChannelError, every fd closed."""
    fd_list = list(fds)
    try:
        kind = data[:1].decode("ascii", errors="replace")
        if kind not in expected:
            raise ChannelError(f"unexpected message kind {kind!a}")
        if len(fd_list) != FDS[kind]:
            raise ChannelError(f"{kind}: {len(fd_list)} fds, expected {FDS[kind]}")
        fields = _check(kind, data, len(data))
    except BaseException:
        close_fds(fd_list)
        raise
    return Message(kind, fields, tuple(fd_list))


def _check(kind: str, data: bytes, size: int) -> dict[str, Any]:
    schema = SCHEMAS.get(kind)
    if schema is None:
        raise ChannelError(f"unknown message kind {kind!a}")
    if size > MAX_MESSAGE:
        raise ChannelError(f"{kind}: {size} bytes, more than {MAX_MESSAGE}")
    try:
        obj = json.loads(
            data[1:].decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
        )
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ChannelError(f"{kind}: not a JSON object: {e}") from None
    except ValueError as e:  # an integer of too many digits (sys.int_info's limit)
        raise ChannelError(f"{kind}: {e}") from None
    fields = _object(kind, obj, schema.keys())
    for key, check in schema.items():
        check(f"{kind}.{key}", fields[key])
    return fields


# --- the socket ------------------------------------------------------------------------------


def send(sock: socket.socket, data: bytes, fds: Iterable[int] = ()) -> None:
    """Send one encoded record with its fds (still the caller's to close afterwards). A full
    socket raises BlockingIOError and sends nothing (a SEQPACKET record goes whole or not at
    all): the caller keeps it queued and retries when the socket is writable."""
    fd_list = list(fds)
    if len(data) > MAX_MESSAGE or len(fd_list) > MAX_FDS:
        raise ChannelError(f"record of {len(data)} bytes and {len(fd_list)} fds is too large")
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fd_list))] if fd_list else []
    # MSG_NOSIGNAL: a front gone is EPIPE for the caller, never SIGPIPE.
    sent = sock.sendmsg([data], anc, socket.MSG_NOSIGNAL)
    if sent != len(data):  # pragma: no cover - SEQPACKET never sends part of a record
        raise ChannelError(f"sent {sent} of {len(data)} bytes")


# Room for more fds than any record may carry, so that surplus ones arrive (and are closed)
# instead of being cut off by the kernel with MSG_CTRUNC.
_ANC_FDS = 16


def recv(sock: socket.socket, expected: Iterable[str]) -> Message | None:
    """Read one record and decode it (``decode``); None at EOF (the peer closed or exited).
    An empty socket raises BlockingIOError (non-blocking) as recvmsg does. A record longer
    than MAX_MESSAGE (MSG_TRUNC) or carrying anything but SCM_RIGHTS is a ChannelError; one
    whose fds the kernel dropped (MSG_CTRUNC) is ``FdsLost``; the fds it brought are closed."""
    # MSG_CMSG_CLOEXEC: a received fd must not leak into any process started later.
    data, anc, flags, _ = sock.recvmsg(
        MAX_MESSAGE, socket.CMSG_SPACE(_ANC_FDS * 4), socket.MSG_CMSG_CLOEXEC
    )
    fds: list[int] = []
    odd = False
    for level, type_, payload in anc:
        if level == socket.SOL_SOCKET and type_ == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
            fds.extend(got)
        else:
            odd = True
    if flags & socket.MSG_TRUNC or odd:
        close_fds(fds)
        if odd:
            raise ChannelError("a record with ancillary data other than SCM_RIGHTS")
        raise ChannelError(f"a record longer than {MAX_MESSAGE} bytes")
    if flags & socket.MSG_CTRUNC:
        # Linux drops the fds it cannot install (scm_detach_fds): EMFILE here, or a sender
        # that sent more than _ANC_FDS. The record itself must still be well-formed.
        close_fds(fds)
        kind = data[:1].decode("ascii", errors="replace")
        fields = _check(kind, data, len(data)) if kind in expected else {}
        if kind not in expected:
            raise ChannelError(f"unexpected message kind {kind!a}")
        raise FdsLost(f"{kind}: its fds were lost (MSG_CTRUNC)", Message(kind, fields, ()))
    if not data and not fds:
        return None
    return decode(expected, data, fds)


def close_fds(fds: Iterable[int]) -> None:
    """Close every fd given, ignoring those already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
