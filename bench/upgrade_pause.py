"""The accept pause of `pyinetd upgrade` (issue 29), against pyinetd's own start-up.

usage: upgrade_pause.py PYTHON [UPGRADES]

PYTHON: the interpreter of the pyinetd to measure (a venv's bin/python; an editable install
starts slower than `pip install .`). Starts pyinetd 5 times (spawn to the first connection
served through a /bin/cat service), then once with a client connecting in a loop and runs
UPGRADES (default 7) `pyinetd upgrade`: prints the medians of the start-up, of the new image's
"upgraded in N ms" and of the client's worst connect-and-echo during each upgrade.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time


def served(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"x")
            s.shutdown(socket.SHUT_WR)
            return s.recv(10) == b"x"
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def main() -> None:
    py, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 7
    folder = tempfile.mkdtemp(prefix="upgrade-pause-")
    port = free_port()
    conf = os.path.join(folder, "inetd.yaml")
    with open(conf, "w") as f:
        f.write(f'services:\n  cat: {{listen: "127.0.0.1:{port}", exec: [/bin/cat]}}\n')
    log = os.path.join(folder, "log")
    starts = []
    for _ in range(5):
        t = time.monotonic()
        with open(log, "w") as err:
            p = subprocess.Popen([py, "-m", "pyinetd", "-c", conf], stderr=err, cwd=folder)
        while not served(port):
            time.sleep(0.002)  # polling for the first connection served: what is measured
        starts.append((time.monotonic() - t) * 1000)
        p.terminate()
        p.wait()
    with open(log, "w") as err:
        p = subprocess.Popen([py, "-m", "pyinetd", "-c", conf], stderr=err, cwd=folder)
    while not served(port):
        time.sleep(0.002)
    worst = [0.0]
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            t = time.monotonic()
            if not served(port):
                raise SystemExit("a connection failed during an upgrade")
            worst[0] = max(worst[0], (time.monotonic() - t) * 1000)

    client = threading.Thread(target=churn)
    client.start()
    worsts = []
    try:
        for _ in range(n):
            time.sleep(0.3)
            worst[0] = 0.0
            r = subprocess.run([py, "-m", "pyinetd", "upgrade", "-c", conf], capture_output=True)
            if r.returncode:
                raise SystemExit(r.stderr.decode())
            time.sleep(0.3)
            worsts.append(worst[0])
    finally:
        stop.set()
        client.join()
        p.terminate()
        p.wait()
    with open(log) as f:
        text = f.read()
    pauses = [float(x) for x in re.findall(r"upgraded in (\d+) ms", text)]
    ready = [float(x) for x in re.findall(r"state ready in ([\d.]+) ms", text)]
    print(f"start-up, spawn to the first connection served: median {median(starts):.0f} ms")
    print(f"accept pause per upgrade (upgraded in N ms): median {median(pauses):.0f} ms {pauses}")
    print(f"  of which the old image, probe's end to exec: median {median(ready):.1f} ms")
    print(f"a client's worst connect+echo during an upgrade: median {median(worsts):.0f} ms")


if __name__ == "__main__":
    main()
