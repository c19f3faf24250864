"""The keys of a service's process, declared once each (see keyspec.Key): its environment
(`env`), umask, nice, rlimits and sandbox. service_keys.py places them, in this order, among
the keys of a service (SERVICE_KEY_LIST). Pure module.
"""

from __future__ import annotations

from pyinetd.config.inputform import _dict_out, _octal_out, _rlimits_out, _sandbox_out
from pyinetd.config.keyspec import (
    CPU_PATTERN,
    SIZE,
    Key,
)
from pyinetd.config.parsers import (
    _parse_env,
    _parse_nice,
    _parse_rlimits,
    _parse_sandbox,
    _parse_umask,
)

__all__ = ["PROCESS_KEY_LIST"]

# The schema of sandbox.read and sandbox.write: one path or a list of them.
_PATH_LIST = {
    "type": ["array", "string"],
    "items": {"type": "string", "minLength": 1},
    "minLength": 1,
    "errorMessage": "expected a list of paths",
}

PROCESS_KEY_LIST: tuple[Key, ...] = (
    Key(
        "env",
        _parse_env,
        "Environment variables to set for the program (NAME: value).",
        {
            "type": "object",
            "propertyNames": {
                "type": "string",
                "minLength": 1,
                "pattern": "^[^=\\u0000]*$",
                "errorMessage": "not a valid environment variable name",
            },
            "additionalProperties": {"type": ["string", "number"], "errorMessage": "expected text"},
            "examples": [{"LANG": "C.UTF-8"}],
            "errorMessage": "expected a mapping NAME: value",
        },
        out=_dict_out,
    ),
    Key(
        "umask",
        _parse_umask,
        "The program's umask, octal: '022' (quote it, YAML reads 022 as a number).",
        {
            "type": ["string", "integer"],
            "pattern": "^0*[0-7]{1,3}$",
            "minimum": 0,
            "maximum": 511,
            "examples": ["022", "077"],
            "errorMessage": "expected an octal mask such as '022'",
        },
        out=_octal_out(3),
    ),
    Key(
        "nice",
        _parse_nice,
        "The program's nice value, -20 (highest priority, root only) to 19.",
        {
            "type": "integer",
            "minimum": -20,
            "maximum": 19,
            "errorMessage": "expected a number from -20 to 19",
        },
    ),
    Key(
        "rlimits",
        _parse_rlimits,
        (
            "Resource limits for the program (setrlimit(2)); sizes take k/M/G/T suffixes (powers "
            "of 1024) or 'unlimited'."
        ),
        {
            "type": "object",
            "properties": {
                "as": {
                    **SIZE,
                    "description": "RLIMIT_AS: address space (virtual memory) in bytes.",
                },
                "core": {
                    **SIZE,
                    "description": "RLIMIT_CORE: largest core file in bytes (0: none).",
                },
                "cpu": {
                    "description": "RLIMIT_CPU: CPU time in seconds (or '10s', '5m', 'unlimited').",
                    "type": ["integer", "string"],
                    "minimum": 0,
                    "maximum": 9223372036854775807,
                    "pattern": CPU_PATTERN,
                    "errorMessage": "expected CPU seconds such as 10, '10s' or '5m'",
                },
                "data": {**SIZE, "description": "RLIMIT_DATA: data segment (heap) in bytes."},
                "fsize": {
                    **SIZE,
                    "description": "RLIMIT_FSIZE: largest file the program may write, in bytes.",
                },
                "nofile": {**SIZE, "description": "RLIMIT_NOFILE: open file descriptors."},
                "nproc": {**SIZE, "description": "RLIMIT_NPROC: processes of the program's user."},
                "rss": {
                    **SIZE,
                    "description": "RLIMIT_RSS: resident memory in bytes (advisory on Linux).",
                },
                "stack": {**SIZE, "description": "RLIMIT_STACK: stack size in bytes."},
                "memlock": {**SIZE, "description": "RLIMIT_MEMLOCK: locked memory in bytes."},
            },
            "additionalProperties": False,
            "examples": [{"as": "512M", "cpu": 10, "nofile": 256}],
            "errorMessage": "expected a mapping such as {nofile: 256, as: 512M}",
        },
        out=_rlimits_out,
    ),
    Key(
        "sandbox",
        _parse_sandbox,
        (
            "Contain the service's program: Landlock filesystem rules, no network, a "
            "private /tmp, a seccomp deny list; implies no_new_privs. Built once per service, "
            "applied in each child before its exec. A rule this kernel cannot enforce refuses the "
            "service. Where the kernel has Landlock scopes (ABI 6), its processes cannot signal a "
            "process outside it, nor (unless network: any) connect to an abstract unix socket "
            "made outside it."
        ),
        {
            "type": "object",
            "properties": {
                "read": {
                    **_PATH_LIST,
                    "description": (
                        "Landlock: the only paths it may read and execute (the program, its "
                        "interpreter and the loader must be under one). Absent: reads are not "
                        "restricted."
                    ),
                },
                "write": {
                    **_PATH_LIST,
                    "description": (
                        "Landlock: the only paths it may write (and read). Absent: writes are not"
                        " restricted."
                    ),
                },
                "network": {
                    "description": (
                        "none: an empty network namespace (no connect, no bind, no loopback);"
                        " loopback: connect, send and bind to the host's loopback addresses only"
                        " (127.0.0.0/8, ::1), other packets dropped (cgroup BPF, as systemd's"
                        " IPAddressDeny=any with IPAddressAllow=localhost); any (default): no rule."
                        " Beyond its fds: the connection pyinetd hands it is not restricted."
                        " Unix sockets by path stay reachable under every value, read and write"
                        " included: their file modes decide."
                    ),
                    "enum": ["none", "loopback", "any"],
                    "errorMessage": "expected none, loopback or any",
                    "default": "any",
                },
                "private_tmp": {
                    "description": "Its own empty /tmp and /var/tmp (a tmpfs each, per service).",
                    "type": "boolean",
                    "errorMessage": "expected true or false",
                    "default": False,
                },
                "syscalls": {
                    "description": (
                        "default: seccomp refuses (EPERM) what no network service needs: mount, "
                        "ptrace, bpf, kexec, module loading, reboot, swap, keyctl, namespaces, "
                        "io_uring...; off (default): no filter."
                    ),
                    "enum": ["default", "off"],
                    "errorMessage": "expected default or off",
                    "default": "off",
                },
            },
            "additionalProperties": False,
            "examples": [
                {
                    "read": ["/usr", "/lib", "/srv/app"],
                    "write": ["/var/lib/app"],
                    "network": "none",
                    "private_tmp": True,
                    "syscalls": "default",
                }
            ],
            "errorMessage": "expected a mapping with read, write, network, private_tmp or syscalls",
        },
        out=_sandbox_out,
    ),
)
