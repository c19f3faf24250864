"""`sandbox: {network: loopback}` (sandbox.py), through cgroup BPF.

What systemd's IPAddressDeny=any + IPAddressAllow=localhost does, per service: a cgroup v2
folder of its own (under pyinetd's cgroup) with BPF programs attached, which the service's
processes join before its exec. Cgroup BPF programs judge a socket by the cgroup it was
created in, so they hold for every socket the service makes, and not for the connection
pyinetd accepted and hands it (created in pyinetd's cgroup): "beyond its fds". Attached:

* connect4/6 and udp4/6_sendmsg (sock_addr): connect() or sendto() to an address outside
  127.0.0.0/8, ::1 and ::ffff:127.0.0.0/104 fails at once with EPERM (a dropped SYN would
  only time out);
* bind4/6: bind() to any other address fails with EPERM (0.0.0.0 and :: too);
* inet ingress and egress (skb): every packet from or to another address is dropped. Ingress
  closes what the address hooks cannot see: listen() or sendto() without bind() binds to
  0.0.0.0 on its own (autobind); egress, what reaches the wire without them (ICMP ping
  sockets, raw sockets of a root service).

Each program is a few instructions, assembled here (no libbpf, no compiler) and loaded with
the raw bpf(2) system call at load; the per-connection cost is the cgroup join
(bench/sandbox_micro.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
import sys
from typing import Any


class CgroupError(ValueError):
    """What the machine refused (sandbox.py says it as a SandboxError)."""


_LIBC: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """The C library (ctypes), loaded once, for the system calls Python has no function for
    (bpf here; landlock and seccomp in sandbox.py)."""
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.syscall.restype = ctypes.c_long
    return _LIBC


_SYS_BPF = {"x86_64": 321, "aarch64": 280}
_BPF_PROG_LOAD, _BPF_PROG_ATTACH = 5, 8
_PROG_CGROUP_SKB, _PROG_CGROUP_SOCK_ADDR = 8, 18
_BPF_F_ALLOW_MULTI = 2  # as systemd: compose with programs attached above (its own, a parent's)
# enum bpf_attach_type
_INGRESS, _EGRESS, _INET4_BIND, _INET6_BIND = 0, 1, 8, 9
_INET4_CONNECT, _INET6_CONNECT, _UDP4_SENDMSG, _UDP6_SENDMSG = 10, 11, 14, 15
_FUNC_SKB_LOAD_BYTES = 26


def _host(octets: bytes) -> int:
    """Bytes as the u32 a BPF load of them reads on this machine."""
    return int.from_bytes(octets, sys.byteorder)


_FIRST_MASK, _FIRST_127 = _host(b"\xff\0\0\0"), _host(b"\x7f\0\0\0")  # the first octet, 127
_V6_ONE, _V6_MAPPED = _host(b"\0\0\0\x01"), _host(b"\0\0\xff\xff")  # ::1, ::ffff:0:0/96
# __sk_buff.protocol: skb->protocol, a big-endian 16-bit field, read as a number
_ETH_P_IP, _ETH_P_IPV6 = _host(b"\x08\x00"), _host(b"\x86\xdd")

# eBPF opcodes (include/uapi/linux/bpf.h, bpf_common.h)
_OPS = {
    "mov": 0xB7,  # ALU64 | MOV | K
    "movr": 0xBF,  # ALU64 | MOV | X
    "add": 0x07,  # ALU64 | ADD | K
    "and32": 0x54,  # ALU | AND | K
    "ldxw": 0x61,  # LDX | MEM | W
    "jeq32": 0x16,  # JMP32 | JEQ | K: 32-bit compares, so that no immediate is sign-extended
    "jne32": 0x56,  # JMP32 | JNE | K
    "jne": 0x55,  # JMP | JNE | K
    "ja": 0x05,
    "call": 0x85,
    "exit": 0x95,
}


def resolve_labels(
    prog: list[tuple[Any, ...]],
) -> tuple[list[tuple[Any, ...]], dict[str, int]]:
    """A program's instructions without its ("label", name) marks, and where each mark is
    (the index of the instruction after it): for this eBPF assembler and sandbox.py's cBPF one."""
    code = [ins for ins in prog if ins[0] != "label"]
    labels: dict[str, int] = {}
    pc = 0
    for ins in prog:
        if ins[0] == "label":
            labels[ins[1]] = pc
        else:
            pc += 1
    return code, labels


def _ebpf(prog: list[tuple[Any, ...]]) -> bytes:
    """Assemble (op, dst, src/imm..., label) tuples into struct bpf_insn[]."""
    code, labels = resolve_labels(prog)
    out = bytearray()
    for pc, ins in enumerate(code):
        op, args = ins[0], ins[1:]
        dst = src = off = imm = 0
        if op in ("mov", "add", "and32"):
            dst, imm = args
        elif op == "movr":
            dst, src = args
        elif op == "ldxw":
            dst, src, off = args
        elif op in ("jeq32", "jne32", "jne"):
            dst, imm, target = args
            off = labels[target] - pc - 1
        elif op == "ja":
            off = labels[args[0]] - pc - 1
        elif op == "call":
            imm = args[0]
        regs = (src << 4 | dst) if sys.byteorder == "little" else (dst << 4 | src)
        imm = imm - (1 << 32) if imm >= 1 << 31 else imm
        out += struct.pack("=BBhi", _OPS[op], regs, off, imm)
    return bytes(out)


def _is_loopback(base: int, off: int, v6: bool, fail: str, ok: str) -> list[tuple[Any, ...]]:
    """Jump to ``ok`` when the address at ``base``+``off`` (4 or 16 bytes, network order) is
    loopback, to ``fail`` otherwise: 127.0.0.0/8; ::1 or ::ffff:127.0.0.0/104."""
    if not v6:
        return [
            ("ldxw", 2, base, off),
            ("and32", 2, _FIRST_MASK),
            ("jeq32", 2, _FIRST_127, ok),
            ("ja", fail),
        ]
    one = f"one{base}{off}"
    return [
        ("ldxw", 2, base, off),
        ("jne32", 2, 0, fail),
        ("ldxw", 2, base, off + 4),
        ("jne32", 2, 0, fail),
        ("ldxw", 2, base, off + 8),
        ("jeq32", 2, 0, one),
        ("jne32", 2, _V6_MAPPED, fail),
        ("ldxw", 2, base, off + 12),
        ("and32", 2, _FIRST_MASK),
        ("jeq32", 2, _FIRST_127, ok),
        ("ja", fail),
        ("label", one),
        ("ldxw", 2, base, off + 12),
        ("jeq32", 2, _V6_ONE, ok),
        ("ja", fail),
    ]


_VERDICT = [
    ("label", "deny"),
    ("mov", 0, 0),
    ("exit",),
    ("label", "allow"),
    ("mov", 0, 1),
    ("exit",),
]


def addr_program(v6: bool) -> bytes:
    """connect/sendmsg/bind hooks: 1 (go on) for a loopback address, 0 (EPERM) otherwise.
    struct bpf_sock_addr: user_ip4 at 4, user_ip6[4] at 8."""
    return _ebpf(_is_loopback(1, 8 if v6 else 4, v6, "deny", "allow") + _VERDICT)


def skb_program(ingress: bool) -> bytes:
    """inet ingress (the source) or egress (the destination): 1 (pass) for loopback, 0 (drop)
    otherwise. skb->data is the IP header; __sk_buff.protocol at 16."""
    prog: list[tuple[Any, ...]] = [
        ("movr", 6, 1),
        ("ldxw", 2, 6, 16),
        ("jeq32", 2, _ETH_P_IP, "v4"),
        ("jeq32", 2, _ETH_P_IPV6, "v6"),
        ("ja", "allow"),  # not IP: not for these sockets to judge
    ]
    for label, off, size in (("v4", 12 if ingress else 16, 4), ("v6", 8 if ingress else 24, 16)):
        prog += [
            ("label", label),
            ("movr", 1, 6),
            ("mov", 2, off),
            ("movr", 3, 10),
            ("add", 3, -16),
            ("mov", 4, size),
            ("call", _FUNC_SKB_LOAD_BYTES),
            ("jne", 0, 0, "deny"),
            *_is_loopback(10, -16, label == "v6", "deny", "allow"),
        ]
    return _ebpf(prog + _VERDICT)


def _programs() -> list[tuple[int, int, bytes]]:
    """(program type, attach type, code) of every program network: loopback attaches."""
    return [
        (_PROG_CGROUP_SOCK_ADDR, _INET4_CONNECT, addr_program(False)),
        (_PROG_CGROUP_SOCK_ADDR, _INET6_CONNECT, addr_program(True)),
        (_PROG_CGROUP_SOCK_ADDR, _UDP4_SENDMSG, addr_program(False)),
        (_PROG_CGROUP_SOCK_ADDR, _UDP6_SENDMSG, addr_program(True)),
        (_PROG_CGROUP_SOCK_ADDR, _INET4_BIND, addr_program(False)),
        (_PROG_CGROUP_SOCK_ADDR, _INET6_BIND, addr_program(True)),
        (_PROG_CGROUP_SKB, _INGRESS, skb_program(True)),
        (_PROG_CGROUP_SKB, _EGRESS, skb_program(False)),
    ]


def _bpf(cmd: int, attr: bytes) -> int:
    c = libc()
    buf = ctypes.create_string_buffer(attr, 128)  # the rest zero, as bpf(2) wants
    r = int(c.syscall(_SYS_BPF[os.uname().machine], cmd, buf, 128))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def _load(prog_type: int, attach: int, code: bytes) -> int:
    """A loaded program's fd; OSError with the verifier's last words when refused."""
    insns = ctypes.create_string_buffer(code, len(code))
    lic = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(0)
    for log_level in (0, 1):  # the verifier's log only when it refused
        if log_level:
            log = ctypes.create_string_buffer(16384)
        attr = struct.pack(
            "=IIQQIIQII16sII",
            prog_type,
            len(code) // 8,
            ctypes.addressof(insns),
            ctypes.addressof(lic),
            log_level,
            len(log) if log_level else 0,
            ctypes.addressof(log) if log_level else 0,
            0,
            0,
            b"pyinetd_lo",
            0,
            attach,
        )
        try:
            return _bpf(_BPF_PROG_LOAD, attr)
        except OSError as exc:
            if log_level or exc.errno not in (errno.EACCES, errno.EINVAL):
                last = log.value.decode(errors="replace").strip().splitlines()[-1:]
                raise OSError(
                    exc.errno, f"{exc.strerror}{': ' + last[0] if last else ''}"
                ) from None
    raise AssertionError("unreachable")


def _cgroup2_mount() -> tuple[str, str] | None:
    """(mount point, root within the hierarchy) of the cgroup v2 hierarchy, or None."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                if fields[sep + 1] == "cgroup2":
                    unescape = fields[4].replace("\\040", " ")
                    return unescape, fields[3]
    except (OSError, ValueError):
        return None
    return None


def own_cgroup() -> str | None:
    """The folder of pyinetd's own cgroup v2 (from /proc/self/cgroup's ``0::/path`` line)."""
    mount = _cgroup2_mount()
    if mount is None:
        return None
    point, root = mount
    try:
        with open("/proc/self/cgroup") as f:
            path = next((ln[3:].rstrip("\n") for ln in f if ln.startswith("0::")), None)
    except OSError:
        return None
    if path is None or path.endswith(" (deleted)"):
        return None
    if root != "/":  # a mount of part of the hierarchy: our path must be inside it
        if not (path == root or path.startswith(root.rstrip("/") + "/")):
            return None
        path = path[len(root.rstrip("/")) :]
    return os.path.join(point, path.lstrip("/"))


def missing() -> str:
    """What network: loopback lacks on this machine, or '' (the rest is found when it is
    prepared: a read-only cgroup folder, bpf(2) refused)."""
    if os.environ.get("PYINETD_TEST_NO_CGROUP_BPF") == "1" or own_cgroup() is None:
        return "a cgroup v2 hierarchy (cgroup2 mount) holding pyinetd, which this machine lacks"
    if os.geteuid() != 0:
        return "pyinetd to run as root (it makes a cgroup and loads BPF programs)"
    if os.uname().machine not in _SYS_BPF:
        return f"bpf(2) on x86_64 or aarch64 ({os.uname().machine} here)"
    return ""


# Cgroup folders of services dropped while their processes still ran: removed once empty
# (sweep_cgroups, at each reaped child and at exit), never left behind on a normal stop.
STALE: set[str] = set()
_serial = 0


def remove_cgroup(path: str) -> bool:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.EBUSY:  # EBUSY: processes remain in it
            raise
        STALE.add(path)
        return False
    STALE.discard(path)
    return True


def sweep_cgroups() -> bool:
    """Remove the stale cgroup folders that are empty now; True when none is left."""
    for path in list(STALE):
        with contextlib.suppress(OSError):
            remove_cgroup(path)
    return not STALE


def settle_cgroups(timeout: float) -> bool:
    """At exit: wait (at most ``timeout`` seconds) until the stale cgroups are empty and gone,
    for processes that are leaving (a warm service's zygote told to quit). Woken by the
    kernel's notification on cgroup.events (POLLPRI), not by polling. True when none is left;
    one a still-running child holds (shutdown: leave) stays, and its processes stay
    contained: the programs go only with the folder (the next pyinetd removes it)."""
    import select
    import time

    end = time.monotonic() + timeout
    while not sweep_cgroups():
        left = end - time.monotonic()
        if left <= 0:
            return False
        poll = select.poll()
        fds = []
        try:
            populated = False
            for path in STALE:
                with contextlib.suppress(OSError):
                    fd = os.open(os.path.join(path, "cgroup.events"), os.O_RDONLY | os.O_CLOEXEC)
                    fds.append(fd)
                    # read once: kernfs reports changes after the last read
                    populated |= b"populated 1" in os.read(fd, 256)
                    poll.register(fd, select.POLLPRI)
            if populated:
                poll.poll(max(1, int(left * 1000)))
        finally:
            for fd in fds:
                os.close(fd)
    return True


def _sweep_dead(parent: str) -> None:
    """Folders a pyinetd that is gone left (its services' processes outlived it, shutdown:
    leave): removed once empty, at the next start."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        parts = name.split("-", 2)
        if not (parts[0] == "pyinetd" and len(parts) == 3 and parts[1].isdigit()):
            continue
        if int(parts[1]) != os.getpid() and not os.path.exists(f"/proc/{parts[1]}"):
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(parent, name))


def loopback_cgroup(service: str) -> tuple[str, int, int]:
    """(folder, its fd, its cgroup.procs fd open for writing): a cgroup for one service with
    the loopback programs attached. SandboxError says what the machine refused."""
    global _serial
    parent = own_cgroup()
    if parent is None:
        raise CgroupError("network: loopback: needs a cgroup v2 hierarchy holding pyinetd")
    if _serial == 0:
        _sweep_dead(parent)
    _serial += 1
    safe = "".join(c if c.isalnum() or c in "_.-" else "_" for c in service)[:200]
    # The pid: workers and a second pyinetd have their own; the serial: a changed sandbox
    # gets a new folder while the old one still holds the processes it started.
    path = os.path.join(parent, f"pyinetd-{os.getpid()}-{_serial}-{safe}")
    try:
        os.mkdir(path, 0o755)
    except OSError as exc:
        raise CgroupError(
            f"network: loopback: needs a writable cgroup v2 folder: mkdir {path}: {exc.strerror}"
        ) from None
    dfd = procs = -1
    progs: list[int] = []
    try:
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        procs = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
        try:
            if os.environ.get("PYINETD_TEST_BPF_FAILS") == "1":
                raise OSError(errno.EPERM, "Operation not permitted (PYINETD_TEST_BPF_FAILS)")
            for prog_type, attach, code in _programs():
                fd = _load(prog_type, attach, code)
                progs.append(fd)
                _bpf(_BPF_PROG_ATTACH, struct.pack("=IIII", dfd, fd, attach, _BPF_F_ALLOW_MULTI))
        except OSError as exc:
            raise CgroupError(
                f"network: loopback: needs bpf(2) to load and attach cgroup programs "
                f"(CAP_BPF and CAP_NET_ADMIN): {exc.strerror}"
            ) from None
    except BaseException:
        for fd in (dfd, procs):
            if fd >= 0:
                os.close(fd)
        with contextlib.suppress(OSError):
            os.rmdir(path)  # (attached programs go with the folder)
        raise
    finally:
        for fd in progs:  # attached, the cgroup holds them
            os.close(fd)
    return path, dfd, procs
