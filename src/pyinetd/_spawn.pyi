def spawn(
    argv: list[bytes],
    env: list[bytes],
    extra_env: list[bytes],
    stdin: int,
    stdout: int,
    stderr: int,
    unused: int,
    reset: tuple[int, ...],
    flags: int = 0,
    /,
    *,
    sandbox: tuple[int, int, int, bytes] | tuple[int, int, int, bytes, int, int] | None = None,
) -> int: ...
def start(
    argv: list[bytes],
    env: list[bytes],
    extra_env: list[bytes],
    stdin: int,
    stdout: int,
    stderr: int,
    report_fd: int,
    reset: tuple[int, ...],
    flags: int = 0,
    /,
    *,
    sandbox: tuple[int, int, int, bytes] | tuple[int, int, int, bytes, int, int] | None = None,
) -> int: ...
def set_slots(n: int, /) -> None: ...
def settle(timeout: float, /) -> bool: ...
def prctl(option: int, arg: int, arg3: int = 0, /) -> None: ...
def set_nofile(soft: int, hard: int, /) -> None: ...
def capset(effective: int, permitted: int, inheritable: int, /) -> None: ...
def serve(ctl_fd: int, environ_data: dict[bytes, bytes] | None, /) -> bool: ...
