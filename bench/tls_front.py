#!/usr/bin/env python3
"""A TLS front (pyinetd.protocols.front) against stunnel4, before the parent side is wired in.

``serve PORT CERT KEY``: a minimal stand-in for pyinetd's parent (one process, one selector):
it listens, hands each connection to one front process as ``C``, posix_spawns /bin/cat on two
pipes at ``H`` and sends ``S``; the front does the handshake and the relay. The default mode
measures it and stunnel4 (``exec = /bin/cat``) interleaved with the shared TLS loadgen (a full
TLS 1.3 handshake per connection, one 64-byte echo), ECDSA P-256 and RSA-2048, then the PSS
per idle TLS connection (200 of them; the front and the cats, the stand-in parent left out)
and the first reply after the handshake (30 connections).

    python3 bench/tls_front.py            # ROUNDS=3 CONNS=1200 CONC=16 LOADGEN=/tmp/loadgen-tls
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from pyinetd.protocols import frontchan  # noqa: E402

BOOT = """
import socket, sys
from pathlib import Path
from pyinetd.protocols import front, tlsconf
from pyinetd.config.parsers import TLSSettings
ctx = tlsconf.make_context(TLSSettings(Path(sys.argv[1]), Path(sys.argv[2])))
run = lambda: front.run(socket.socket(fileno=int(sys.argv[3])), front.FrontSettings(name="b", ctx=ctx))
if len(sys.argv) > 4:  # a profile of the front's loop, written when the parent goes
    import cProfile
    cProfile.run("run()", sys.argv[4])
    sys.exit(0)
sys.exit(run())
"""


def serve(port: int, cert: str, key: str) -> None:
    lsn = socket.socket()
    lsn.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsn.bind(("127.0.0.1", port))
    lsn.listen(1024)
    lsn.setblocking(False)
    chan, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    front = subprocess.Popen(
        [
            sys.executable,
            "-c",
            BOOT,
            cert,
            key,
            str(theirs.fileno()),
            *([os.environ["FRONT_PROFILE"]] if os.environ.get("FRONT_PROFILE") else []),
        ],
        pass_fds=(theirs.fileno(),),
        env=env,
    )
    theirs.close()
    chan.setblocking(False)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the cats are reaped by the kernel
    sel = selectors.DefaultSelector()
    sel.register(lsn, selectors.EVENT_READ, "accept")
    sel.register(chan, selectors.EVENT_READ, "chan")
    next_id = 0
    queue: list[tuple[bytes, list[int]]] = []
    while front.poll() is None:
        for key_, _ in sel.select(1.0):
            if key_.data == "accept":
                for _ in range(64):
                    try:
                        conn, addr = lsn.accept()
                    except BlockingIOError:
                        break
                    next_id += 1
                    msg = frontchan.encode(
                        "C",
                        {"id": next_id, "peer": list(addr), "local": None, "deadline": 10.0,
                         "refuse": None},
                    )  # fmt: skip
                    queue.append((msg, [conn.detach()]))
            else:
                for _ in range(64):
                    try:
                        m = frontchan.recv(chan, frontchan.FRONT_TO_PARENT)
                    except BlockingIOError:
                        break
                    if m is None:
                        return
                    if m.kind == "H":
                        in_r, in_w = os.pipe()
                        out_r, out_w = os.pipe()
                        os.posix_spawn(
                            "/bin/cat",
                            ["cat"],
                            os.environ,
                            file_actions=[
                                (os.POSIX_SPAWN_DUP2, in_r, 0),
                                (os.POSIX_SPAWN_DUP2, out_w, 1),
                            ],
                            setsigdef=(signal.SIGCHLD, signal.SIGPIPE),
                        )
                        os.close(in_r)
                        os.close(out_w)
                        queue.append((frontchan.encode("S", {"id": m.fields["id"]}), [in_w, out_r]))
        while queue:
            data, fds = queue[0]
            try:
                frontchan.send(chan, data, fds)
            except BlockingIOError:
                break
            queue.pop(0)
            frontchan.close_fds(fds)


# --- the measurements ----------------------------------------------------------------------


def certs(kind: str, d: Path) -> tuple[Path, Path]:
    key = (
        ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        if kind == "ec"
        else ["-newkey", "rsa:2048"]
    )
    subprocess.run(["openssl", "req", "-x509", *key, "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-keyout", str(d / f"{kind}.key"), "-out", str(d / f"{kind}.crt")],
                   check=True, capture_output=True)  # fmt: skip
    os.chmod(d / f"{kind}.key", 0o600)
    return d / f"{kind}.crt", d / f"{kind}.key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int) -> None:
    end = time.monotonic() + 10
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def load(loadgen: str, port: int, conns: int, conc: int) -> dict[str, float]:
    out = subprocess.run([loadgen, "127.0.0.1", str(port), str(conns), str(conc), "64", "60", "10"],
                         capture_output=True, text=True, env={**os.environ, "LOADGEN_TLS": "1"})  # fmt: skip
    vals = {}
    for kv in out.stdout.split():
        k, _, v = kv.partition("=")
        with contextlib.suppress(ValueError):
            vals[k] = float(v)
    return vals


def tree(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                st = (d / "stat").read_text()
                kids.setdefault(int(st[st.rindex(")") + 2 :].split()[1]), []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def pss(pids: list[int]) -> int:
    total = 0
    for p in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
    return total


def idle_kib(port: int, pids: callable, n: int = 200) -> float:  # type: ignore[valid-type]
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE

    def one() -> ssl.SSLSocket:
        s = ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", port), 15), server_hostname="localhost"
        )
        s.sendall(b"ping\n")
        while not s.recv(100).endswith(b"\n"):
            pass
        return s

    one().close()
    time.sleep(1)
    before = pss(pids())
    socks = [one() for _ in range(n)]
    time.sleep(1)
    after = pss(pids())
    for s in socks:
        s.close()
    return (after - before) / n


def first_reply_ms(port: int) -> float:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    firsts = []
    for _ in range(30):
        with (
            socket.create_connection(("127.0.0.1", port), 15) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as s,
        ):
            t = time.perf_counter()
            s.sendall(b"line\n")
            got = b""
            while not got.endswith(b"\n"):
                got += s.recv(100)
            firsts.append((time.perf_counter() - t) * 1000)
    return statistics.median(firsts)


def main() -> None:
    rounds = int(os.environ.get("ROUNDS", "3"))
    conns = int(os.environ.get("CONNS", "1200"))
    conc = int(os.environ.get("CONC", "16"))
    loadgen = os.environ.get("LOADGEN", "/tmp/loadgen-tls")
    d = Path(tempfile.mkdtemp(prefix="tls-front-"))
    for kind in ("ec", "rsa"):
        cert, key = certs(kind, d)
        fport, sport = free_port(), free_port()
        conf = d / f"st-{kind}.conf"
        conf.write_text(f"foreground = yes\npid =\ndebug = 3\n[cat]\naccept = 127.0.0.1:{sport}\n"
                        f"exec = /bin/cat\ncert = {cert}\nkey = {key}\n")  # fmt: skip
        fr = subprocess.Popen(
            [sys.executable, __file__, "serve", str(fport), str(cert), str(key)],
            start_new_session=True,
        )
        st = subprocess.Popen(
            ["stunnel4", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_port(fport)
            wait_port(sport)
            load(loadgen, fport, 100, 8), load(loadgen, sport, 100, 8)
            res: dict[str, list[dict[str, float]]] = {"front": [], "stunnel": []}
            for i in range(rounds):
                order = [("front", fport), ("stunnel", sport)]
                for name, port in order if i % 2 == 0 else order[::-1]:
                    res[name].append(load(loadgen, port, conns, conc))
            ratios = [
                a["rate"] / b["rate"]
                for a, b in zip(res["front"], res["stunnel"], strict=True)
                if b.get("rate")
            ]
            med = {n: statistics.median(r.get("rate", 0) for r in v) for n, v in res.items()}
            p99 = {n: statistics.median(r.get("p99_ms", 0) for r in v) for n, v in res.items()}
            fail = sum(r.get("fail", 0) for r in res["front"])
            print(f"{kind}: front {med['front']:.0f} conn/s vs stunnel {med['stunnel']:.0f} = "
                  f"{statistics.median(ratios):.2f} x (rounds {', '.join(f'{r:.2f}' for r in ratios)}); "
                  f"p99 {p99['front']:.1f} vs {p99['stunnel']:.1f} ms; {fail:.0f} failed", flush=True)  # fmt: skip
            if kind == "ec":
                # The front and its cats: the tree under the stand-in parent, the parent left out.
                root, sroot = fr.pid, st.pid
                mine = idle_kib(fport, lambda: [p for p in tree(root) if p != root])
                theirs = idle_kib(sport, lambda: tree(sroot))
                print(f"PSS per idle TLS connection: front+cat {mine:.0f} KiB vs stunnel {theirs:.0f} KiB "
                      f"= {mine / theirs:.2f} x", flush=True)  # fmt: skip
                print(f"first reply after the handshake (median of 30): front {first_reply_ms(fport):.1f} ms, "
                      f"stunnel {first_reply_ms(sport):.1f} ms", flush=True)  # fmt: skip
        finally:
            for p in (fr, st):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        main()
