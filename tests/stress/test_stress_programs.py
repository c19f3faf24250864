"""Real inetd-mode programs as services, each talked to by its real client."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import DEADLINE, Pyinetd, children_of, free_port, wait_for
from stresslib import public_dir, scaled

from pyinetd.protocols.builtins import RFC868_OFFSET

Start = Callable[..., Pyinetd]


def need(*programs: str) -> list[str]:
    """Full paths of ``programs``; skip the test when one is not installed."""
    paths = [shutil.which(p) for p in programs]
    missing = [p for p, path in zip(programs, paths, strict=True) if path is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    return [p for p in paths if p is not None]


def run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=DEADLINE, cwd=cwd)


def test_busybox_httpd_inetd_mode_with_curl(inetd: Start, tmp_path: Path) -> None:
    busybox, curl = need("busybox", "curl")
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("<h1>served by busybox via pyinetd</h1>\n")
    port = free_port()
    httpd = [busybox, "httpd", "-i", "-h", str(www)]  # -i: inetd mode, the client on 0 and 1
    p = inetd({"services": {"http": {"listen": f"127.0.0.1:{port}", "exec": httpd}}})
    url = f"http://127.0.0.1:{port}"
    n = scaled(20)
    for _ in range(n):
        out = run([curl, "-sS", "--max-time", str(DEADLINE), f"{url}/index.html"])
        assert out.returncode == 0, out.stderr
        assert out.stdout == "<h1>served by busybox via pyinetd</h1>\n"
    out = run([curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{url}/missing"])
    assert out.stdout == "404"
    p.wait_log(r"http: pid \d+ ended \(exit 0\)", count=n)
    wait_for(lambda: not children_of(p.pid), what="every httpd reaped")


@pytest.mark.skipif(os.geteuid() != 0, reason="in.tftpd --secure chroots and drops to nobody")
def test_tftpd_hpa_in_udp_wait_mode_with_tftp(inetd: Start, tmp_path: Path) -> None:
    tftpd, tftp = need("in.tftpd", "tftp")
    port = free_port(socket.SOCK_DGRAM)
    payload = bytes(range(256)) * 40 + b"end\n"  # 10 KiB: twenty 512-byte blocks and a short one
    with public_dir() as root:  # in.tftpd drops to nobody and chroots here (--secure)
        (root / "boot.bin").write_bytes(payload)
        (root / "boot.bin").chmod(0o644)
        # -t 1: after serving, wait 1 s for another request, then exit (inetd respawns it).
        p = inetd({"services": {"tftp": {
            "listen": f"127.0.0.1:{port}", "protocol": "udp", "wait": True,
            "exec": [tftpd, "--secure", "-t", "1", str(root)],
        }}})  # fmt: skip
        for i in (1, 2):
            local = tmp_path / f"got{i}.bin"
            out = run([tftp, "127.0.0.1", str(port), "-m", "octet", "-c", "get", "boot.bin",
                       str(local)])  # fmt: skip
            assert out.returncode == 0, out.stdout + out.stderr
            assert local.read_bytes() == payload
            # The wait-mode child exits on its own; the parent then watches the socket again,
            # so the second fetch is served by a new in.tftpd.
            (line,) = p.wait_log(r"tftp: wait -> pid \d+", count=i)[i - 1 :]
            pid = line.rsplit(" ", 1)[1]
            p.wait_log(rf"tftp: pid {pid} ended \(exit 0\)")


def test_builtin_time_with_rdate_tcp_and_udp(inetd: Start) -> None:
    (rdate,) = need("rdate")
    tcp, udp = free_port(), free_port(socket.SOCK_DGRAM)
    inetd({"services": {
        "t": {"listen": f"127.0.0.1:{tcp}", "builtin": "time"},
        "u": {"listen": f"127.0.0.1:{udp}", "protocol": "udp", "builtin": "time"},
    }})  # fmt: skip
    for extra in ([], ["-u"]):
        # -p: print, do not set the clock; -o: port; -u: RFC 868 over UDP.
        out = run([rdate, "-p", *extra, "-o", str(tcp if not extra else udp), "127.0.0.1"])
        assert out.returncode == 0, out.stderr
        assert str(time.gmtime().tm_year) in out.stdout
    # And the value itself, as rdate reads it: seconds since 1900, within a few seconds.
    with socket.create_connection(("127.0.0.1", tcp), timeout=DEADLINE) as s:
        raw = s.recv(4)
    assert abs(struct.unpack("!I", raw)[0] - RFC868_OFFSET - time.time()) < 5
