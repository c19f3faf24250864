"""A per-service sandbox: parsed once, prepared once per service, applied in each child.

The ``sandbox:`` key of a service::

    sandbox:
      read: [/usr, /lib, /etc/ssl, /srv/app]  # Landlock: the only paths it may read and execute
      write: [/var/lib/app]                   # Landlock: the only paths it may write (and read)
      network: none                           # none | loopback | any
      private_tmp: true                       # its own empty /tmp and /var/tmp
      syscalls: default                       # default | off: seccomp deny list

Three stages, so that a connection pays only for the few system calls that apply the rules:

* ``parse()`` (config load): the mapping -> a frozen ``SandboxSettings``; a rule this kernel
  cannot enforce is a load error, never a silently weaker sandbox.
* ``prepare()`` (service load): a Landlock ruleset fd, a compiled seccomp BPF program, and
  namespaces held as fds (an empty network namespace for ``network: none``, a mount namespace
  with fresh tmpfs on /tmp and /var/tmp for ``private_tmp``), made by a short-lived helper
  process that unshares and whose ``/proc/PID/ns/*`` fds pyinetd keeps.
* the child, before its exec: setns (still root), the user drop, ``PR_SET_NO_NEW_PRIVS``,
  ``landlock_restrict_self``, the seccomp filter last (so the filter need not allow the setup
  calls), execve. ``_spawn.c`` does it with raw system calls (``sandbox=`` of start/spawn);
  ``Prepared.restrict()``/``enter()`` do the same through ctypes on the fork path.

``network: loopback`` is a cgroup v2 folder per service with BPF programs attached (see
"network: loopback" below), which the child joins: clone3(CLONE_INTO_CGROUP) in the C
clone child, a write to its cgroup.procs on the other paths.

Tests simulate a kernel without a feature with ``PYINETD_TEST_NO_LANDLOCK=1``,
``PYINETD_TEST_LANDLOCK_ABI=N``, ``PYINETD_TEST_NO_NETNS=1``, ``PYINETD_TEST_NO_SECCOMP=1``,
``PYINETD_TEST_NO_CGROUP_BPF=1``, and one that refuses namespaces or BPF programs at
preparation (a container) with ``PYINETD_TEST_UNSHARE_FAILS=1`` or
``PYINETD_TEST_BPF_FAILS=1``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import signal
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyinetd.sandbox import cgroupnet

KEYS = ("read", "write", "network", "private_tmp", "syscalls")
NETWORK = ("none", "loopback", "any")
SYSCALLS = ("default", "off")


class SandboxError(ValueError):
    """A sandbox setting that is wrong, or that this kernel cannot enforce."""


@dataclass(frozen=True)
class SandboxSettings:
    """A service's ``sandbox:`` mapping, validated. None/False: no rule of that kind."""

    read: tuple[str, ...] | None = None
    write: tuple[str, ...] | None = None
    network: str = "any"
    private_tmp: bool = False
    syscalls: str = "off"

    def to_dict(self) -> dict[str, Any]:
        """The input form (for --print-config)."""
        out: dict[str, Any] = {}
        if self.read is not None:
            out["read"] = list(self.read)
        if self.write is not None:
            out["write"] = list(self.write)
        if self.network != "any":
            out["network"] = self.network
        if self.private_tmp:
            out["private_tmp"] = True
        if self.syscalls != "off":
            out["syscalls"] = self.syscalls
        return out


# ---------------------------------------------------------------- kernel features

_SYS_LANDLOCK_CREATE_RULESET = 444  # the same numbers on every architecture (Linux 5.13)
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1

# LANDLOCK_ACCESS_FS_* (include/uapi/linux/landlock.h), with the ABI that brought each.
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_WRITE_DIR = sum(1 << b for b in range(4, 13))  # remove, make char/dir/reg/sock/fifo/blk/sym
_FS_REFER, _FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15  # ABI 2, 3, 5
_READ_RIGHTS = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
# Handled with the other write rights but granted nowhere: a root service that may make a
# block device node in a writable folder reads the raw disk beneath every rule.
_FS_MAKE_DEVICE = 1 << 6 | 1 << 11  # MAKE_CHAR, MAKE_BLOCK
_FILE_RIGHTS = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
# Truncation is a write only Landlock ABI 3 can refuse: below it, `write` would leave every
# readable file truncatable, so it needs 3. `read` needs 1.
READ_MIN_ABI, WRITE_MIN_ABI = 1, 3
# LANDLOCK_SCOPE_* (ABI 6, Linux 6.12): IPC that may not leave the domain. Without them a
# sandboxed service signals every process of its uid outside the sandbox (kill(2) checks the
# uid alone), and connects to any abstract unix socket of its network namespace.
# Set wherever the kernel has them, as hardening beyond the configured rules: a
# kernel without them is no reason to refuse a service.
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1, 2
SCOPE_MIN_ABI = 6


def landlock_scopes(s: SandboxSettings, abi: int) -> int:
    """The scopes a sandbox's ruleset gets on a kernel of Landlock ABI ``abi``: signals always;
    abstract unix sockets unless ``network: any`` (which sets no network rule, and an abstract
    socket belongs to the network namespace)."""
    if abi < SCOPE_MIN_ABI:
        return 0
    return _SCOPE_SIGNAL | (_SCOPE_ABSTRACT_UNIX_SOCKET if s.network != "any" else 0)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when it has none (or a test says so)."""
    if os.environ.get("PYINETD_TEST_NO_LANDLOCK") == "1":
        return 0
    if forced := os.environ.get("PYINETD_TEST_LANDLOCK_ABI"):
        return int(forced)
    abi = cgroupnet.libc().syscall(
        _SYS_LANDLOCK_CREATE_RULESET, None, 0, _LANDLOCK_CREATE_RULESET_VERSION
    )
    return max(0, int(abi))  # -1: ENOSYS (not built) or EOPNOTSUPP (disabled at boot)


def _have_ns(kind: str) -> bool:
    if os.environ.get("PYINETD_TEST_NO_NETNS") == "1" and kind == "net":
        return False
    return os.path.exists(f"/proc/self/ns/{kind}")


def _have_seccomp() -> bool:
    if os.environ.get("PYINETD_TEST_NO_SECCOMP") == "1":
        return False
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        return any(line.startswith("Seccomp:") for line in f)
    return False


# ---------------------------------------------------------------- parse (config load)


def _paths(value: Any, key: str, base: Path) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(p, str) and p for p in items):
        raise SandboxError(f"{key}: {value!r}: expected a list of paths")
    # Relative to the config file's folder, like exec and cwd; no realpath: the rule follows
    # the path when prepared (a later symlink swap by root is root's own choice).
    return tuple(os.path.normpath(p if os.path.isabs(p) else str(base / p)) for p in items)


def parse(value: Any, base: Path) -> SandboxSettings:
    """The ``sandbox`` mapping -> SandboxSettings; SandboxError says 'KEY: what is wrong'."""
    if not isinstance(value, dict):
        raise SandboxError(f"{value!r}: expected a mapping with read, write, network, "
                           "private_tmp or syscalls")  # fmt: skip
    for k in value:
        if k not in KEYS:
            from pyinetd.suggest import unknown_key

            raise SandboxError(f"{k}: {unknown_key(str(k), list(KEYS))}")
    read = _paths(value["read"], "read", base) if "read" in value else None
    write = _paths(value["write"], "write", base) if "write" in value else None
    network = value.get("network", "any")
    if network not in NETWORK:
        raise SandboxError(f"network: {network!r}: expected none, loopback or any")
    private_tmp = value.get("private_tmp", False)
    if not isinstance(private_tmp, bool):
        raise SandboxError(f"private_tmp: {private_tmp!r}: expected true or false")
    syscalls = value.get("syscalls", "off")
    if syscalls not in SYSCALLS:
        raise SandboxError(f"syscalls: {syscalls!r}: expected default or off")
    settings = SandboxSettings(read, write, network, private_tmp, syscalls)
    check_kernel(settings)
    return settings


def check_kernel(s: SandboxSettings) -> None:
    """Refuse a rule this kernel (or pyinetd) cannot enforce: never a weaker sandbox."""
    refused = "refused rather than run less contained than configured"
    if s.read is not None or s.write is not None:
        abi = landlock_abi()
        need, key = (WRITE_MIN_ABI, "write") if s.write is not None else (READ_MIN_ABI, "read")
        if abi < need:
            raise SandboxError(
                f"{key}: this kernel has Landlock ABI {abi}, {key} needs {need} or later; {refused}"
            )
    if s.network == "loopback":
        # Landlock (ABI 4) filters TCP by port only: telling the host's loopback from other
        # addresses takes cgroup BPF programs (what systemd's IPAddressDeny= uses).
        why = cgroupnet.missing()
        if why:
            raise SandboxError(f"network: loopback: needs {why}; {refused}")
    if (s.network == "none" or s.private_tmp) and os.geteuid() != 0:
        key = "network: none" if s.network == "none" else "private_tmp"
        raise SandboxError(f"{key}: needs pyinetd to run as root (it prepares a namespace)")
    if s.network == "none" and not _have_ns("net"):
        raise SandboxError(f"network: none needs network namespaces, which this kernel lacks; "
                           f"{refused}")  # fmt: skip
    if s.private_tmp and not _have_ns("mnt"):
        raise SandboxError(
            f"private_tmp: needs mount namespaces, which this kernel lacks; {refused}"
        )
    if s.syscalls == "default" and (_arch() is None or not _have_seccomp()):
        raise SandboxError(
            f"syscalls: default needs seccomp on x86_64 or aarch64 ({os.uname().machine} here); "
            f"{refused}"
        )


# ---------------------------------------------------------------- --check: what exec reads


def _open_regular(path: str) -> int:
    """``path`` opened non-blocking, a regular file only (OSError otherwise): the program may
    be in its service user's folder, who can put a FIFO there, whose blocking open(2) would
    hang the loop at a reload."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.ENXIO, "not a regular file")
    return fd


def _elf_interpreter(path: str) -> str | None:
    """PT_INTERP of a 64-bit little-endian ELF file (the dynamic loader), or None."""
    try:
        with os.fdopen(_open_regular(path), "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                return None
            phoff, = struct.unpack_from("<Q", head, 32)  # fmt: skip
            phentsize, phnum = struct.unpack_from("<HH", head, 54)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            for i in range(phnum):
                ptype, _, offset, _, _, size = struct.unpack_from("<IIQQQQ", table, i * phentsize)
                if ptype == 3:  # PT_INTERP
                    f.seek(offset)
                    return f.read(size).rstrip(b"\0").decode()
    except (OSError, struct.error, UnicodeDecodeError):
        return None
    return None


def _shebang(path: str, search: str | None) -> list[str]:
    """The interpreter a ``#!`` line names, and for ``#!/usr/bin/env NAME`` also the NAME
    that env will find on the service's PATH (``search``)."""
    try:
        with os.fdopen(_open_regular(path), "rb") as f:
            line = f.readline(256)
    except OSError:
        return []
    if not line.startswith(b"#!"):
        return []
    words = [os.fsdecode(w) for w in line[2:].split()]
    if not words:
        return []
    out = [words[0]]
    if os.path.basename(words[0]) == "env":
        names = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
        import shutil  # here, not at the top: with bz2 and lzma it is 1.8 MiB of the parent's RSS

        found = shutil.which(names[0], path=search) if names else None
        if found is not None:
            out.append(os.path.abspath(found))
    return out


def exec_paths(program: str, search: str | None = None) -> list[str]:
    """The program, its shebang interpreter(s) and the ELF loader: what execve must read."""
    out: list[str] = []
    todo = [program]
    while todo and len(out) < 8:
        path = todo.pop(0)
        if path in out:
            continue
        out.append(path)
        interps = _shebang(path, search)
        if not interps:
            loader = _elf_interpreter(path)
            if loader is not None:
                todo.append(loader)
        todo += interps
    return out


def _under(path: str, roots: tuple[str, ...]) -> bool:
    real = os.path.realpath(path)
    for root in roots:
        r = os.path.realpath(root)
        if real == r or real.startswith(r.rstrip("/") + "/"):
            return True
    return False


def unreadable_exec_paths(s: SandboxSettings, program: str, search: str | None) -> list[str]:
    """Paths execve needs (program, interpreter, loader) that ``read`` does not cover;
    ``search``: the service's PATH, where ``#!/usr/bin/env NAME`` finds NAME."""
    if s.read is None:
        return []
    allowed = s.read + (s.write or ())
    return [p for p in exec_paths(program, search) if not _under(p, allowed)]


# ---------------------------------------------------------------- seccomp

_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_X32_BIT = 0x40000000
# What no network service needs, with why. Denied with EPERM (not a kill: a program that
# probes, e.g. for io_uring, goes on with its fallback).
_DENIED: dict[str, tuple[int | None, int | None]] = {  # name: (x86_64, aarch64)
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51),
    "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
    "move_mount": (429, 429), "open_tree": (428, 428), "mount_setattr": (442, 442),
    "unshare": (272, 97), "setns": (308, 268),  # namespaces: the kernel's larger surface
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "kcmp": (312, 272), "pidfd_getfd": (438, 438),  # other processes' memory and fds
    "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294), "reboot": (169, 142),
    "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106),
    "swapon": (167, 224), "swapoff": (168, 225), "acct": (163, 89), "quotactl": (179, 60),
    "quotactl_fd": (443, 443), "syslog": (103, 116), "vhangup": (153, 58),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264),
    "settimeofday": (164, 170), "clock_settime": (227, 112), "adjtimex": (159, 171),
    "clock_adjtime": (305, 266), "lookup_dcookie": (212, 18),
    "sethostname": (170, 161), "setdomainname": (171, 162),
    "fanotify_init": (300, 262),  # root: fds of files opened anywhere, beneath Landlock
    "ioperm": (173, None), "iopl": (172, None), "modify_ldt": (154, None), "uselib": (134, None),
    "_sysctl": (156, None), "create_module": (174, None), "get_kernel_syms": (177, None),
    "query_module": (178, None), "nfsservctl": (180, None),
}  # fmt: skip
# What a front process (front.py: it handshakes and relays, and never starts a program) is
# denied on top of _DENIED: a parser holding a service's key that a client's bytes take over
# must not become a shell (execve), a second process (fork, clone without CLONE_THREAD), or a
# debugger of its neighbours (ptrace, process_vm_*: already in _DENIED).
_FRONT_DENIED: dict[str, tuple[int | None, int | None]] = {
    "execve": (59, 221), "execveat": (322, 281), "fork": (57, None), "vfork": (58, None),
}  # fmt: skip
_CLONE_THREAD = 0x00010000
_CLONE = {"x86_64": 56, "aarch64": 220}
_CLONE3 = 435
_PERSONALITY = {"x86_64": 135, "aarch64": 92}
# personality(): only the harmless values (query, PER_LINUX, PER_LINUX32, UNAME26): others
# (READ_IMPLIES_EXEC, ADDR_NO_RANDOMIZE) weaken the next exec's protections.
_PERSONALITY_OK = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
# As the filter tests them: the query, then no bit outside PER_LINUX32 | UNAME26.
_PERSONALITY_QUERY, _PERSONALITY_ANY_BITS = 0xFFFFFFFF, 0xFFFFFFFF & ~(0x8 | 0x20000)
# clone() with a CLONE_NEW* flag is unshare() by another name.
_CLONE_NEW_FLAGS = 0x7E020000

_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000


def _arch() -> str | None:
    machine = os.uname().machine
    return machine if machine in _AUDIT_ARCH else None


def seccomp_filter(arch: str | None = None, front: bool = False) -> bytes:
    """The compiled ``syscalls: default`` filter (struct sock_filter[]) for this machine;
    ``front``: a front process's, which also denies execve, execveat, fork, vfork and
    clone() other than a thread's."""
    arch = arch or _arch()
    assert arch is not None
    return _seccomp_filter(arch, front)


# What a filter costs is paid when it is attached, at every spawn (Linux 5.11+,
# kernel/seccomp.c): the kernel converts the program to eBPF and JITs it (bpf_jit_enable is 1
# here), in time linear in its length, about 0.1 us per instruction on this machine; then,
# to build its action cache, it runs the program in a small emulator (seccomp_is_const_allow)
# once for every system call number of each ABI it knows, about 2 ns per instruction run;
# the rest (allocation, the JIT image's text_poke) is about 10 us whatever the program. So
# the program is short and its common paths are shorter: a search tree on the call number
# over the intervals that share a decision, each leaf a jump straight to one shared return,
# weighted by how many numbers each interval holds. bench/seccomp_attach.c: the seccomp()
# call took 38.6 us with the plain binary search before (140 instructions), 25.9 us with
# this (61), 11.6 us with a 1-instruction filter.
_NR_WEIGHTED = 512  # numbers the cache emulates: the kernel's table (about 470 in 6.18)


@functools.cache
def _seccomp_filter(arch: str, front: bool = False) -> bytes:
    col = 0 if arch == "x86_64" else 1
    denied = {**_DENIED, **_FRONT_DENIED} if front else _DENIED
    action = {n: "deny" for n in (nr[col] for nr in denied.values()) if n is not None}
    # clone3 passes its flags in memory a filter cannot read: ENOSYS makes glibc fall back
    # to clone(), whose flags it can (as Docker and systemd do).
    action.update({_CLONE[arch]: "clone", _CLONE3: "enosys", _PERSONALITY[arch]: "personality"})
    intervals: list[tuple[int, str]] = []  # (first number, decision), up to the next's first
    for nr in range(max(action) + 2):
        what = action.get(nr, "allow")
        if not intervals or intervals[-1][1] != what:
            intervals.append((nr, what))
    if arch == "x86_64":  # the x32 ABI: the same arch, numbers with bit 30 set
        intervals.append((_X32_BIT, "deny"))
    ends = [lo for lo, _ in intervals[1:]] + [_NR_WEIGHTED]
    weights = tuple(
        max(0, min(end, _NR_WEIGHTED) - lo) for (lo, _), end in zip(intervals, ends, strict=True)
    )
    prog: list[tuple[Any, ...]] = [
        ("ld", 4),  # seccomp_data.arch
        # A foreign ABI (i386 through int 0x80 on x86_64) numbers system calls otherwise:
        # it gets nothing, in three steps (its hundreds of numbers are emulated too).
        ("jeq", _AUDIT_ARCH[arch], None, "deny"),
        ("ld", 0),  # seccomp_data.nr
        *_search_tree(intervals, _split_points(weights), 0, len(intervals)),
        ("label", "clone"),
        ("ld", 16),  # args[0], low 32 bits (little-endian)
        # clone() with a CLONE_NEW* flag is unshare() by another name.
        *(
            [("jset", _CLONE_NEW_FLAGS, "deny", None), ("jset", _CLONE_THREAD, "allow", "deny")]
            if front
            else [("jset", _CLONE_NEW_FLAGS, "deny", "allow")]
        ),
        ("label", "personality"),
        ("ld", 16),
        # _PERSONALITY_OK in two tests: the query, then the values with no bit outside
        # 0x20008 (0, 0x8, 0x20000, 0x20008): what the list allows, no more.
        ("jeq", _PERSONALITY_QUERY, "allow", None),
        ("jset", _PERSONALITY_ANY_BITS, "deny", "allow"),
        ("label", "deny"),
        ("ret", _RET_ERRNO | errno.EPERM),
        ("label", "allow"),
        ("ret", _RET_ALLOW),
        ("label", "enosys"),
        ("ret", _RET_ERRNO | errno.ENOSYS),
    ]
    return _assemble(prog)


def _split_points(weights: tuple[int, ...]) -> dict[tuple[int, int], int]:
    """The optimal alphabetic tree over the intervals (Knuth's dynamic program for optimal
    binary search trees, leaves only): for each span [i, j) of intervals, the interval the
    right subtree starts at, so that the sum over numbers of comparisons made is least."""
    n = len(weights)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    cost: dict[tuple[int, int], int] = {(i, i + 1): 0 for i in range(n)}
    root: dict[tuple[int, int], int] = {}
    for size in range(2, n + 1):
        for i in range(n - size + 1):
            j = i + size
            best, at = min((cost[i, m] + cost[m, j], m) for m in range(i + 1, j))
            cost[i, j] = best + prefix[j] - prefix[i]  # one more comparison for each number
            root[i, j] = at
    return root


def _search_tree(
    intervals: list[tuple[int, str]], root: dict[tuple[int, int], int], i: int, j: int
) -> list[tuple[Any, ...]]:
    """The tree over intervals[i:j] (two or more) as ``jge`` tests whose leaves jump to
    their decision's shared return: no per-leaf instructions (each would be converted and
    JITted at every spawn), and an inner subtree always on the fall-through side (one eBPF
    jump, not a jump and a ``ja``)."""
    m = root[i, j]
    left = _search_tree(intervals, root, i, m) if m - i > 1 else []
    right = _search_tree(intervals, root, m, j) if j - m > 1 else []
    right_to = f"n{m}_{j}" if right else intervals[m][1]
    if left:
        return [("jge", intervals[m][0], right_to, None), *left,
                *([("label", right_to), *right] if right else [])]  # fmt: skip
    if right:
        return [("jge", intervals[m][0], None, intervals[i][1]), *right]
    return [("jge", intervals[m][0], right_to, intervals[i][1])]


def _assemble(prog: list[tuple[Any, ...]]) -> bytes:
    code, labels = cgroupnet.resolve_labels(prog)
    out = bytearray()
    for pc, ins in enumerate(code):
        op = ins[0]
        if op == "ld":
            out += struct.pack("=HBBI", _LD_W_ABS, 0, 0, ins[1])
        elif op == "ret":
            out += struct.pack("=HBBI", _RET, 0, 0, ins[1])
        else:
            jt = labels[ins[2]] - pc - 1 if ins[2] else 0
            jf = labels[ins[3]] - pc - 1 if ins[3] else 0
            assert 0 <= jt < 256 and 0 <= jf < 256
            out += struct.pack("=HBBI", {"jeq": _JEQ, "jge": _JGE, "jset": _JSET}[op], jt, jf,
                               ins[1])  # fmt: skip
    return bytes(out)


# ---------------------------------------------------------------- prepare (service load)


class _RulesetAttr(ctypes.Structure):
    # struct landlock_ruleset_attr: handled_access_net came with ABI 4 (no rule here uses it:
    # zero), scoped with ABI 6. An older kernel is given the first field only.
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _landlock_ruleset(s: SandboxSettings, abi: int) -> int:
    libc = cgroupnet.libc()
    write_rights = _FS_WRITE_FILE | _FS_WRITE_DIR
    write_rights |= (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0)
    write_rights |= _FS_IOCTL_DEV if abi >= 5 else 0
    handled = (_READ_RIGHTS if s.read is not None else 0) | (
        write_rights if s.write is not None else 0
    )
    scoped = landlock_scopes(s, abi)
    attr = _RulesetAttr(handled, 0, scoped)
    size = ctypes.sizeof(attr) if scoped else _RulesetAttr.handled_access_net.offset
    fd = int(libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), size, 0))
    if fd < 0:
        e = ctypes.get_errno()
        raise SandboxError(f"landlock_create_ruleset: {os.strerror(e)}")
    # Paths that do not exist get no rule: nothing is allowed there (stricter, never weaker).
    rules = [(p, _READ_RIGHTS) for p in s.read or ()]
    rules += [(p, (write_rights & ~_FS_MAKE_DEVICE) | _READ_RIGHTS) for p in s.write or ()]
    try:
        for path, rights in rules:
            try:
                pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                if not os.path.isdir(f"/proc/self/fd/{pfd}"):
                    rights &= _FILE_RIGHTS  # a file takes file rights only (else EINVAL)
                rule = _PathBeneath(rights & handled, pfd)
                r = libc.syscall(_SYS_LANDLOCK_ADD_RULE, fd, _LANDLOCK_RULE_PATH_BENEATH,
                                 ctypes.byref(rule), 0)  # fmt: skip
                if r < 0:
                    e = ctypes.get_errno()
                    raise SandboxError(f"landlock rule for {path}: {os.strerror(e)}")
            finally:
                os.close(pfd)
    except BaseException:
        os.close(fd)
        raise
    return fd


_MS_REC, _MS_SLAVE, _MS_NOSUID, _MS_NODEV = 1 << 14, 1 << 19, 2, 4
_CLONE_NEWNS, _CLONE_NEWNET = 0x20000, 0x40000000


def _namespace_helper(flags: int, private_tmp: bool) -> tuple[int, int]:
    """(netns fd, mntns fd), -1 where not asked: a helper process unshares, mounts, and
    waits while its /proc/PID/ns files are opened; the fds keep the namespaces alive."""
    libc = cgroupnet.libc()
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    old_mask = signal.pthread_sigmask(signal.SIG_SETMASK, signal.valid_signals())
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the helper
            code = 1
            try:
                os.close(ready_r)
                os.close(done_w)
                if os.environ.get("PYINETD_TEST_UNSHARE_FAILS") == "1":
                    raise OSError(errno.EPERM, "unshare (PYINETD_TEST_UNSHARE_FAILS)")
                if libc.unshare(flags) < 0:  # EPERM in a container that forbids it
                    raise OSError(ctypes.get_errno(), "unshare")
                if private_tmp:
                    # Our mounts must not reach the host: its mounts still reach us (slave).
                    if libc.mount(b"none", b"/", None, _MS_REC | _MS_SLAVE, None) < 0:
                        raise OSError(ctypes.get_errno(), "mount --make-rslave /")
                    for tmp in (b"/tmp", b"/var/tmp"):
                        if not os.path.isdir(tmp):
                            continue
                        if libc.mount(b"tmpfs", tmp, b"tmpfs", _MS_NOSUID | _MS_NODEV,
                                      b"mode=1777,size=10%") < 0:  # fmt: skip
                            raise OSError(ctypes.get_errno(), f"mount tmpfs on {tmp!r}")
                os.write(ready_w, b"1")
                os.read(done_r, 1)
                code = 0
            except BaseException as exc:
                with contextlib.suppress(BaseException):
                    os.write(ready_w, f"0{exc}".encode())
            finally:
                os._exit(code)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    os.close(ready_w)
    os.close(done_r)
    net = mnt = -1
    try:
        answer = os.read(ready_r, 512)
        if answer != b"1":
            raise SandboxError(f"namespaces: {answer[1:].decode(errors='replace')}")
        if flags & _CLONE_NEWNET:
            net = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        if flags & _CLONE_NEWNS:
            mnt = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        for fd in (net, mnt):
            if fd >= 0:
                os.close(fd)
        raise
    finally:
        os.close(ready_r)
        os.close(done_w)  # the helper leaves
        os.waitpid(pid, 0)
    return net, mnt


class Prepared:
    """A service's sandbox, built once: fds and a filter that each child applies."""

    def __init__(self, settings: SandboxSettings, service: str = "service") -> None:
        check_kernel(settings)
        self.settings = settings
        self.ruleset_fd = self.netns_fd = self.mntns_fd = -1
        self.cgroup_fd = self.procs_fd = -1  # network: loopback
        self.cgroup = ""
        self.filter = b""
        try:
            if settings.network == "loopback":
                try:
                    made = cgroupnet.loopback_cgroup(service)
                except cgroupnet.CgroupError as exc:
                    raise SandboxError(str(exc)) from None
                self.cgroup, self.cgroup_fd, self.procs_fd = made
            # One ruleset, made here once, holds the path rules and the scopes: a child only
            # applies it (landlock_restrict_self), whatever it contains.
            abi = landlock_abi()
            paths = settings.read is not None or settings.write is not None
            if paths or landlock_scopes(settings, abi):
                self.ruleset_fd = _landlock_ruleset(settings, abi)
            flags = (_CLONE_NEWNET if settings.network == "none" else 0) | (
                _CLONE_NEWNS if settings.private_tmp else 0
            )
            if flags:
                self.netns_fd, self.mntns_fd = _namespace_helper(flags, settings.private_tmp)
            if settings.syscalls == "default":
                self.filter = seccomp_filter()
        except BaseException:
            self.close()
            raise
        # What _spawn's start/spawn take as sandbox=: kept, so no tuple is built per spawn.
        self.c_arg = (self.netns_fd, self.mntns_fd, self.ruleset_fd, self.filter,
                      self.cgroup_fd, self.procs_fd)  # fmt: skip

    def fds(self) -> frozenset[int]:
        """The fds a child needs until it has applied the sandbox."""
        return frozenset(
            fd
            for fd in (self.netns_fd, self.mntns_fd, self.ruleset_fd, self.cgroup_fd, self.procs_fd)
            if fd >= 0
        )

    def close(self) -> None:
        """Close the fds and remove the cgroup (later, once its processes are gone: see
        cgroupnet.sweep_cgroups). Call only once no child is before its exec (Spawner.settle())."""
        for name in ("ruleset_fd", "netns_fd", "mntns_fd", "cgroup_fd", "procs_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        if self.cgroup:
            with contextlib.suppress(OSError):
                cgroupnet.remove_cgroup(self.cgroup)
            self.cgroup = ""

    # The fork path's application (the same steps as _spawn.c's, through ctypes).

    def enter(self) -> None:
        """In the child, as root, before the user drop: join the service's cgroup (a
        migration: the clone child is born in it instead) and the prepared namespaces."""
        if self.procs_fd >= 0:
            os.write(self.procs_fd, b"0")  # "0": the writing process itself (cgroup v2)
        libc = cgroupnet.libc()
        for fd, kind in ((self.netns_fd, _CLONE_NEWNET), (self.mntns_fd, _CLONE_NEWNS)):
            if fd >= 0 and libc.setns(fd, kind) < 0:
                raise OSError(ctypes.get_errno(), "setns")

    def restrict(self) -> None:
        """In the child, after the user drop, right before execve: no_new_privs, Landlock,
        then the seccomp filter (last: nothing after it but the exec)."""
        libc = cgroupnet.libc()
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if (
            self.ruleset_fd >= 0
            and libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, self.ruleset_fd, 0) < 0
        ):
            raise OSError(ctypes.get_errno(), "landlock_restrict_self")
        if self.filter:
            attach_filter(self.filter)


def attach_filter(program: bytes) -> None:
    """seccomp(SECCOMP_SET_MODE_FILTER) with ``program`` (struct sock_filter[]) on this
    thread; no_new_privs (or CAP_SYS_ADMIN) must already be set. Raises OSError."""
    libc = cgroupnet.libc()
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if libc.syscall(_SYS_SECCOMP[os.uname().machine], 1, 0, ctypes.byref(prog)) < 0:
        raise OSError(ctypes.get_errno(), "seccomp")


_PR_SET_NO_NEW_PRIVS = 38
_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


# ---------------------------------------------------------------- pyinetd security


def describe(user: str, nnp: bool, s: SandboxSettings | None) -> dict[str, str]:
    """What contains a service, column by column, and an exposure grade, as
    ``systemd-analyze security`` grades units: how much a remote code execution in the
    service reaches, from 0.0 (contained) to 10.0 (root, nothing contains it)."""
    root = user == "root"
    if s is None:
        fs, net, sys_, tmp = "all", "any", "all", "shared"
    else:
        fs = "read " + (",".join(s.read) if s.read is not None else "all")
        fs += " write " + (",".join(s.write) if s.write is not None else "all")
        net, tmp = s.network, "private" if s.private_tmp else "shared"
        sys_ = "filtered" if s.syscalls == "default" else "all"
        nnp = True
    scoped = landlock_scopes(s, landlock_abi()) if s is not None else 0
    names = [("signals", _SCOPE_SIGNAL), ("abstract_unix", _SCOPE_ABSTRACT_UNIX_SOCKET)]
    ipc = ",".join(name for name, bit in names if scoped & bit) or "none"
    score = 3.0 if root else 1.0  # its own user still has its own files and processes
    score += 0.0 if nnp else 0.5 if not root else 0.0  # a user can regain root by setuid
    score += 1.5 if s is None or s.read is None else 0.0  # every secret its user may read
    score += (2.0 if root else 1.0) if s is None or s.write is None else 0.0
    # a foothold to scan and attack the network; with loopback, the host's local services
    score += 1.5 if net == "any" else 0.5 if net == "loopback" else 0.0
    score += 1.5 if sys_ == "all" else 0.0  # the whole kernel as attack surface
    score += 0.5 if tmp == "shared" else 0.0  # other services' temporary files
    score = min(10.0, score)
    grade = (
        "OK" if score < 2.5 else "MEDIUM" if score < 5.0 else "EXPOSED" if score < 8.0 else "UNSAFE"
    )
    return {
        "user": user,
        "no_new_privs": "yes" if nnp else "no",
        "filesystem": fs,
        "network": net,
        "syscalls": sys_,
        "tmp": tmp,
        "scoped": ipc,  # the IPC that stays inside the sandbox (Landlock scopes)
        "exposure": f"{score:.1f} {grade}",
    }
