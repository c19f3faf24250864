def spawn(
    argv: list[bytes],
    env: list[bytes],
    extra_env: list[bytes],
    stdin: int,
    stdout: int,
    stderr: int,
    errpipe_read: int,
    errpipe_write: int,
    reset: tuple[int, ...],
    /,
) -> int: ...
