"""The parent <-> front channel's codec over a real SEQPACKET socketpair (frontchan.py)."""

from __future__ import annotations

import array
import contextlib
import os
import socket
from collections.abc import Iterator

import pytest

from pyinetd.protocols import frontchan
from pyinetd.protocols.frontchan import FRONT_TO_PARENT, PARENT_TO_FRONT, ChannelError


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def _raw(sock: socket.socket, data: bytes, fds: list[int] | None = None) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)


C_FIELDS = {
    "id": 7,
    "peer": ["192.0.2.1", 4433],
    "local": None,
    "deadline": 2.5,
    "refuse": None,
}

GOOD = {
    "C": C_FIELDS,
    "S": {"id": 1},
    "N": {"id": 1, "reason": "cannot start /bin/cat: ENOENT"},
    "X": {"id": 1, "code": 0, "signal": None},
    "K": {"id": 2**53},
    "D": {},
    "H": {"id": 1, "env": {"SSL_PROTOCOL": "TLSv1.3", "SSL_CLIENT_S_DN": "CN=x\\0A"}},
    "F": {"id": 1, "reason": "TLS handshake not completed within 10 s"},
    "E": {"id": 1, "bytes_in": 0, "bytes_out": 2**40},
}


@pytest.mark.parametrize("kind", sorted(GOOD))
def test_every_kind_round_trips_with_its_fds(
    pair: tuple[socket.socket, socket.socket], kind: str
) -> None:
    a, b = pair
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(frontchan.FDS[kind])]
    try:
        frontchan.send(a, frontchan.encode(kind, GOOD[kind]), fds)
        msg = frontchan.recv(b, PARENT_TO_FRONT | FRONT_TO_PARENT)
    finally:
        frontchan.close_fds(fds)
    assert msg is not None
    assert msg.kind == kind
    assert msg.fields == GOOD[kind]
    assert len(msg.fds) == len(fds)
    for fd in msg.fds:  # fresh fds, close-on-exec, on the same file
        assert fd not in fds
        assert not os.get_inheritable(fd)
        assert os.fstat(fd).st_ino == os.stat("/dev/null").st_ino
    frontchan.close_fds(msg.fds)


def test_refuse_and_local_address_are_accepted() -> None:
    fields = {
        **C_FIELDS,
        "local": ["::1", 443],
        "refuse": {"status": 403, "reason": "Forbidden", "body": "no\r\n"},
    }
    msg = frontchan.decode("C", frontchan.encode("C", fields), [99999])
    assert msg.fields["refuse"]["status"] == 403


def test_eof_is_none(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.close()
    assert frontchan.recv(b, PARENT_TO_FRONT) is None


def test_empty_socket_would_block(pair: tuple[socket.socket, socket.socket]) -> None:
    with pytest.raises(BlockingIOError):
        frontchan.recv(pair[1], PARENT_TO_FRONT)


BAD_RECORDS = [
    (b"C{not json", "JSON"),
    (b"Z{}", "kind"),
    (b"", "kind"),  # decoded directly: an empty record
    (b"H[]", "object"),
    (b'S{"id":1,"id":2}', "twice"),
    (b'S{"id":0}', "S.id"),
    (b'S{"id":9007199254740993}', "S.id"),
    (b'S{"id":true}', "S.id"),
    (b'S{"id":1.0}', "S.id"),
    (b'S{"id":"1"}', "S.id"),
    (b'S{"id":1,"extra":2}', "unexpected"),
    (b"S{}", "missing"),
    (b'E{"id":1,"bytes_in":-1,"bytes_out":0}', "bytes_in"),
    (b'X{"id":1,"code":256,"signal":null}', "code"),
    (b'X{"id":1,"code":null,"signal":0}', "signal"),
    (b'F{"id":1,"reason":"a\\u0000b"}', "NUL"),
    (b'F{"id":1,"reason":"line\\nSSL_CLIENT_VERIFY=SUCCESS"}', "control"),
    (b'F{"id":1,"reason":"\\ud800"}', "control"),
    (b'F{"id":1,"reason":"' + b"x" * 257 + b'"}', "longer"),
    (b'F{"id":1,"reason":5}', "string"),
    (b'H{"id":1,"env":{"ssl_protocol":"x"}}', "variable name"),
    (b'H{"id":1,"env":{"A=B":"x"}}', "variable name"),
    (b'H{"id":1,"env":{"A":"x\\u0000"}}', "NUL"),
    (b'H{"id":1,"env":{"A":["x"]}}', "string"),
    (b'H{"id":1,"env":[]}', "object"),
    (b'C{"id":1,"peer":["1.2.3.4"],"local":null,"deadline":1,"refuse":null}', "peer"),
    (b'C{"id":1,"peer":["1.2.3.4",65536],"local":null,"deadline":1,"refuse":null}', "peer"),
    (b'C{"id":1,"peer":["1.2.3.4",1],"local":null,"deadline":NaN,"refuse":null}', "number"),
    (b'C{"id":1,"peer":["1.2.3.4",1],"local":null,"deadline":0,"refuse":null}', "deadline"),
    (b'C{"id":1,"peer":["1.2.3.4",1],"local":null,"deadline":1e9,"refuse":null}', "deadline"),
    (b'C{"id":1,"peer":["1.2.3.4",1],"local":null,"deadline":1,"refuse":{}}', "refuse"),
    (b"S" + b'{"id":1' + b"9" * 5000 + b"}", "digits|bytes"),
    (b"\xffS{}", "kind"),
    (b'S{"id":1}\xff', "JSON"),
]


@pytest.mark.parametrize(("data", "why"), BAD_RECORDS)
def test_malformed_records_are_channel_errors(data: bytes, why: str) -> None:
    kind = data[:1].decode("latin-1")
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(frontchan.FDS.get(kind, 0))]
    with pytest.raises(ChannelError, match=why):
        frontchan.decode(PARENT_TO_FRONT | FRONT_TO_PARENT, data, fds)
    for fd in fds:  # the record's fds are closed with it
        with pytest.raises(OSError):
            os.fstat(fd)


def test_encode_refuses_what_decode_would(pair: tuple[socket.socket, socket.socket]) -> None:
    with pytest.raises(ChannelError):
        frontchan.encode("F", {"id": 1, "reason": "a\x00b"})
    with pytest.raises(ChannelError):
        frontchan.encode("H", {"id": 1, "env": {f"V{i}": "x" * 4000 for i in range(3)}})
    with pytest.raises(ChannelError):
        frontchan.encode("Q", {})


def test_a_kind_not_expected_here_is_refused() -> None:
    # The front never sends C; the parent never sends H.
    with pytest.raises(ChannelError, match="unexpected"):
        frontchan.decode(FRONT_TO_PARENT, frontchan.encode("C", C_FIELDS), [])


def test_oversized_record_is_truncated_and_refused(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    _raw(a, b'F{"id":1,"reason":"' + b"x" * frontchan.MAX_MESSAGE + b'"}')
    with pytest.raises(ChannelError, match="longer than"):
        frontchan.recv(b, FRONT_TO_PARENT)
    # The next record is read whole: the oversized one did not leak into it.
    frontchan.send(a, frontchan.encode("F", {"id": 2, "reason": "x"}))
    msg = frontchan.recv(b, FRONT_TO_PARENT)
    assert msg is not None and msg.fields["id"] == 2


def test_wrong_fd_count_closes_every_fd(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    before = _open_fds()
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(2)]
    _raw(a, frontchan.encode("C", C_FIELDS), fds)  # C carries 1 fd
    frontchan.close_fds(fds)
    with pytest.raises(ChannelError):
        frontchan.recv(b, PARENT_TO_FRONT)
    assert _open_fds() == before
    # An H (no fds) that brings one.
    fd = os.open("/dev/null", os.O_RDONLY)
    _raw(a, frontchan.encode("H", {"id": 1, "env": {}}), [fd])
    os.close(fd)
    with pytest.raises(ChannelError, match="fds"):
        frontchan.recv(b, FRONT_TO_PARENT)
    assert _open_fds() == before


def test_too_many_fds_are_all_closed(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    before = _open_fds()
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(40)]  # more than recv has room for
    _raw(a, frontchan.encode("K", {"id": 1}), fds)
    frontchan.close_fds(fds)
    with pytest.raises(frontchan.FdsLost):
        frontchan.recv(b, PARENT_TO_FRONT)
    assert _open_fds() == before
    with pytest.raises(ChannelError):
        frontchan.send(a, frontchan.encode("K", {"id": 1}), [0, 1, 2])


def test_send_on_full_socket_would_block(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    data = frontchan.encode("K", {"id": 1})
    sent = 0
    with pytest.raises(BlockingIOError):
        while True:
            frontchan.send(a, data)
            sent += 1
    assert sent > 0
    got = 0
    while True:
        try:
            msg = frontchan.recv(b, PARENT_TO_FRONT)
        except BlockingIOError:
            break
        assert msg is not None and msg.kind == "K"
        got += 1
    assert got == sent


def test_fds_lost_at_the_fd_limit_keep_the_message(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """EMFILE in the receiver: the kernel drops the fd and sets MSG_CTRUNC; the front learns
    which connection it was (to answer F) instead of dying on a ChannelError."""
    import resource

    a, b = pair
    fd = os.open("/dev/null", os.O_RDONLY)
    _raw(a, frontchan.encode("C", C_FIELDS), [fd])
    os.close(fd)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(_open_fds()) + 8, hard))
        with contextlib.suppress(OSError):
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        with pytest.raises(frontchan.FdsLost) as lost:
            frontchan.recv(b, PARENT_TO_FRONT)
    finally:
        frontchan.close_fds(held)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert lost.value.message.kind == "C"
    assert lost.value.message.fields["id"] == 7
    assert lost.value.message.fds == ()
