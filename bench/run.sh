#!/usr/bin/env bash
# bench/run.sh - pyinetd against the inetd-style anchors, then the report (and the scale runs).
#
# The anchors (openbsd-inetd, xinetd, tcpserver, socat, plain-Python references) and the load
# generator live in the shared bench kit beside the repository clone (../shared/bench); this
# script adds pyinetd's rows through the kit's EXTRA hook, runs it, and turns its results.tsv
# into bench/results/latest.md and latest.png (bench/report.py), then appends the scale
# experiments (bench/scale.py). It installs nothing.
#
# Needs (Debian/Ubuntu):  apt-get install -y openbsd-inetd ucspi-tcp socat gcc
#   (xinetd is fetched by the kit with `apt-get download`, since it conflicts with
#   openbsd-inetd; python3 with PyYAML and matplotlib, and pyinetd importable.)
#
# Usage:  bench/run.sh                    (as root, so openbsd-inetd can run in a private
#                                          mount namespace; see anchors.sh)
# Environment (defaults):
#   PYINETD_PYTHON=python3   interpreter that runs `python -m pyinetd -c CONFIG` (or, without
#                            pyinetd/__main__.py, pyinetd.cli:main as the console script does)
#   REPORT_PYTHON=           interpreter for report.py and scale.py (matplotlib, PyYAML); by
#                            default PYINETD_PYTHON if it has them, else python3
#   PYINETD_ARGS=            extra words appended to the pyinetd command (e.g. --log-level warning)
#   PYINETD_WORKERS=1        0 leaves out the pyinetd-w2 row (same exec service, `workers: 2`)
#   PYINETD_PRIMITIVES=1     0 leaves out the via-vfork and via-fork_exec rows (same exec
#                            service with PYINETD_SPAWN=vfork / fork_exec)
#   PYINETD_SANDBOX=1        (as root) 0 leaves out pyinetd-sandbox (the /bin/cat service with the full
#                            sandbox, on PORT_BASE+14)
#   PYINETD_PYROWS=1         0 leaves out py-cold, py-warm, tcpserver-py and ref-pyfork (an 8-line
#                            Python echo script: exec'd per connection, `warm: true`, under
#                            tcpserver, and forked by bench/ref_pyfork.py, on PORT_BASE+22)
#   SHARED=<repo>/../shared  the shared kit; anchors.sh is $SHARED/bench/anchors.sh
#   OUTDIR=bench/out/<utc>   configs, logs, results.tsv, anchors.txt
#   RESULTS_DIR=bench/results  where latest.md and latest.png go
#   SCALE=1                  0 skips bench/scale.py   SCALE_ARGS=  extra words for scale.py
#   ALLOW_MISSING=0          1 runs even when some apt packages are missing (their rows skip)
#   Passed through to anchors.sh: PORT_BASE CONNS WARMUP CONC PAYLOAD ROUNDS FLOOR_N ONLY SKIP
#   PYTHON XINETD XINETD_CACHE TIME_BUDGET INETD, and EXTRA (your file is sourced after ours).
# pyinetd rows: pyinetd (exec /bin/cat) on PORT_BASE+15, pyinetd-echo (builtin echo) on +16,
# pyinetd-w2 (exec /bin/cat, workers: 2) on +17; references ref-loop and ref-2loops
# (bench/ref_twoloops.py: pyinetd's spawn primitive in a bare loop, in 1 and 2 processes) on
# +18 and +19; ref-c and ref-c-2loops (bench/ref_vfork.c, compiled into OUTDIR: the same loop
# in C with a bare vfork+execve, the floor of any super-server of this design) on +12 and +13.
# Python services (issue 19): py-cold (pyinetd exec'ing an 8-line Python echo script), py-warm
# (the same service with `warm: true`: forked from a zygote) and tcpserver-py (tcpserver exec'ing
# it) on +7, +8 and +9, as shared/checks/bars/perf-python-warm runs them; quick check of the
# rows alone: ONLY="py-cold py-warm tcpserver-py" SCALE=0 CONNS=600 ROUNDS=1 bench/run.sh
set -euo pipefail
export LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(git -C "$HERE" rev-parse --show-toplevel 2>/dev/null || dirname "$HERE")
SHARED=${SHARED:-$REPO/../shared}
ANCHORS=$SHARED/bench/anchors.sh
PYINETD_PYTHON=${PYINETD_PYTHON:-python3}
PYINETD_ARGS=${PYINETD_ARGS:-}
PYINETD_WORKERS=${PYINETD_WORKERS:-1}
PYINETD_PRIMITIVES=${PYINETD_PRIMITIVES:-1}
RESULTS_DIR=${RESULTS_DIR:-$HERE/results}
SCALE=${SCALE:-1}
SCALE_ARGS=${SCALE_ARGS:-}
ALLOW_MISSING=${ALLOW_MISSING:-0}
USER_EXTRA=${EXTRA:-}
PORT_BASE=${PORT_BASE:-17001}

die() { echo "run.sh: $*" >&2; exit 2; }
note() { echo "run.sh: $*" >&2; }

[[ $PORT_BASE =~ ^[0-9]+$ ]] && (( PORT_BASE >= 1024 && PORT_BASE + 24 <= 65535 )) ||
    die "PORT_BASE must be an integer in 1024..65511, got '$PORT_BASE'"
[[ -r $ANCHORS ]] || die "shared bench kit not found: $ANCHORS (set SHARED=path/to/shared)"

# ---------------------------------------------------------------- requirements
# package -> a file it installs that the kit uses
declare -A NEEDS=([openbsd-inetd]=/usr/sbin/inetd [ucspi-tcp]=tcpserver [socat]=socat [gcc]=gcc)
missing=()
for pkg in openbsd-inetd ucspi-tcp socat gcc; do
    probe=${NEEDS[$pkg]}
    if [[ $probe == /* ]]; then [[ -x $probe ]] || missing+=("$pkg")
    else command -v "$probe" >/dev/null || missing+=("$pkg"); fi
done
if (( ${#missing[@]} )); then
    msg="missing apt packages: ${missing[*]} (apt-get install -y ${missing[*]})"
    in_missing() { [[ " ${missing[*]} " == *" $1 "* ]]; }
    in_missing gcc && die "$msg; gcc is required to build the load generator"
    (( ALLOW_MISSING )) || die "$msg; ALLOW_MISSING=1 runs without their rows"
    note "$msg; their rows are skipped"
fi
"$PYINETD_PYTHON" -c 'import pyinetd' 2>/dev/null ||
    die "$PYINETD_PYTHON cannot import pyinetd (pip install -e $REPO, or set PYINETD_PYTHON)"
# `python -m pyinetd` needs pyinetd/__main__.py; without it, call the console script's entry
# point the way the generated `pyinetd` script does.
if "$PYINETD_PYTHON" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("pyinetd.__main__") is None)'; then
    LAUNCH=("$PYINETD_PYTHON" -m pyinetd)
else
    LAUNCH=("$PYINETD_PYTHON" -c 'import sys; from pyinetd.cli import main; sys.exit(main())')
fi
# Measure what an installed pyinetd runs: its modules byte-compiled, as pip does at install
# time. A source checkout under PYTHONDONTWRITEBYTECODE=1 otherwise compiles them at every
# start, and the compiler's memory stays in the parent's RSS (~4 MiB, 22.6 vs 18.9 MiB here).
"$PYINETD_PYTHON" -c 'import compileall, os, pyinetd
compileall.compile_dir(os.path.dirname(pyinetd.__file__), quiet=1)' >/dev/null ||
    note "could not byte-compile pyinetd; its RSS includes the compiler's"
# The report and the scale runs need matplotlib and PyYAML: pyinetd's own interpreter has them
# after `pip install -e '.[test]'`; a bare python3 on PATH may not.
REPORT_PYTHON=${REPORT_PYTHON:-}
if [[ -z $REPORT_PYTHON ]]; then
    for cand in "$PYINETD_PYTHON" python3; do
        if "$cand" -c 'import matplotlib, yaml' 2>/dev/null; then REPORT_PYTHON=$cand; break; fi
    done
fi
[[ -n $REPORT_PYTHON ]] ||
    die "neither $PYINETD_PYTHON nor python3 has matplotlib and PyYAML for the report (pip install matplotlib pyyaml)"

OUTDIR=${OUTDIR:-$HERE/out/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUTDIR" "$RESULTS_DIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
gcc -O2 -Wall -Wextra -o "$OUTDIR/ref_vfork" "$HERE/ref_vfork.c" || die "could not build bench/ref_vfork.c"

# ---------------------------------------------------------------- pyinetd configs
P_CAT=$((PORT_BASE + 15))
P_ECHO=$((PORT_BASE + 16))
P_W2=$((PORT_BASE + 17))
cat >"$OUTDIR/pyinetd-cat.yaml" <<EOF
services:
  cat: {listen: "127.0.0.1:$P_CAT", exec: [/bin/cat]}
EOF
# per_source: the bench client is one address with CONC in flight; a TCP built-in has
# per_source: 10 unless set. (extra-before.sh sets the same for the older commit.)
cat >"$OUTDIR/pyinetd-echo.yaml" <<EOF
services:
  echo: {listen: "127.0.0.1:$P_ECHO", builtin: echo, per_source: 1000}
EOF
cat >"$OUTDIR/pyinetd-w2.yaml" <<EOF
workers: 2
services:
  cat: {listen: "127.0.0.1:$P_W2", exec: [/bin/cat]}
EOF

# The same /bin/cat service with the full sandbox (issue 17): Landlock read/write, an empty
# network namespace, a private /tmp, the seccomp filter (network and tmp need root).
PYINETD_SANDBOX=${PYINETD_SANDBOX:-$([[ $(id -u) == 0 ]] && echo 1 || echo 0)}
P_SBX=$((PORT_BASE + 14))
cat >"$OUTDIR/pyinetd-sandbox.yaml" <<EOF
services:
  cat:
    listen: "127.0.0.1:$P_SBX"
    exec: [/bin/cat]
    sandbox:
      read: [/usr, /lib, /lib64, /bin]
      write: [/dev/null]
      network: none
      private_tmp: true
      syscalls: default
EOF

PYINETD_PYROWS=${PYINETD_PYROWS:-1}
if [[ $PYINETD_PYROWS == 1 ]]; then
    # The script runs under pyinetd's own interpreter: a warm zygote loads pyinetd's C module.
    PY_ABS=$("$PYINETD_PYTHON" -c 'import sys; print(sys.executable)')
    cat >"$OUTDIR/echo.py" <<'PY'
#!/usr/bin/env python3
import sys
r = sys.stdin.buffer.raw
while True:
    data = r.read(65536)
    if not data:
        break
    sys.stdout.buffer.write(data); sys.stdout.buffer.flush()
PY
    for mode in cold warm; do
        warm=$([[ $mode == warm ]] && echo ", warm: true" || true)
        port=$((PORT_BASE + $([[ $mode == warm ]] && echo 8 || echo 7)))
        printf 'services:\n  py: {listen: "127.0.0.1:%s", exec: [%s, %s/echo.py]%s}\n' \
            "$port" "$PY_ABS" "$OUTDIR" "$warm" >"$OUTDIR/pyinetd-py-$mode.yaml"
    done
fi

# The EXTRA file is sourced by anchors.sh, so every word is quoted here with %q.
read -r -a pyargs <<<"$PYINETD_ARGS"
q() { printf ' %q' "$@"; }
EXTRA_FILE=$OUTDIR/pyinetd-extra.sh
{
    echo "# written by bench/run.sh; sourced by anchors.sh"
    echo "bench_server pyinetd $P_CAT --$(q "${LAUNCH[@]}" -c "$OUTDIR/pyinetd-cat.yaml" ${pyargs[@]+"${pyargs[@]}"})"
    # The same exec service without the per-connection log lines (--log-level warning).
    echo "bench_server pyinetd-quiet $P_CAT --$(q "${LAUNCH[@]}" -c "$OUTDIR/pyinetd-cat.yaml" --log-level warning)"
    echo "bench_server pyinetd-echo $P_ECHO internal --$(q "${LAUNCH[@]}" -c "$OUTDIR/pyinetd-echo.yaml" ${pyargs[@]+"${pyargs[@]}"})"
    if [[ $PYINETD_PRIMITIVES == 1 ]]; then
        # The same exec service with pyinetd's other spawn primitives forced (PYINETD_SPAWN):
        # what not waiting for the exec (clone, the default) gains over vfork, and over CPython's
        # fork_exec, in the same run. `env` execs, so the measured pid is pyinetd's.
        for prim in vfork fork_exec; do
            echo "bench_server via-$prim $P_CAT --$(q env "PYINETD_SPAWN=$prim" "${LAUNCH[@]}" -c "$OUTDIR/pyinetd-cat.yaml" ${pyargs[@]+"${pyargs[@]}"})"
        done
    fi
    if [[ $PYINETD_SANDBOX == 1 ]]; then
        echo "bench_server pyinetd-sandbox $P_SBX --$(q "${LAUNCH[@]}" -c "$OUTDIR/pyinetd-sandbox.yaml" ${pyargs[@]+"${pyargs[@]}"})"
    fi
    if [[ $PYINETD_WORKERS == 1 ]]; then
        echo "bench_server pyinetd-w2 $P_W2 --$(q "${LAUNCH[@]}" -c "$OUTDIR/pyinetd-w2.yaml" ${pyargs[@]+"${pyargs[@]}"})"
    fi
    if [[ $PYINETD_PYROWS == 1 ]]; then
        for mode in cold warm; do
            echo "bench_server py-$mode $((PORT_BASE + $([[ $mode == warm ]] && echo 8 || echo 7))) --$(q "${LAUNCH[@]}" -c "$OUTDIR/pyinetd-py-$mode.yaml" --log-level warning)"
        done
        if command -v tcpserver >/dev/null; then
            echo "bench_server tcpserver-py $((PORT_BASE + 9)) --$(q tcpserver -RHl0 -c 1000 -b 128 127.0.0.1 "$((PORT_BASE + 9))" "$PY_ABS" "$OUTDIR/echo.py")"
        fi
        # The floor: compile once, os.fork() per connection, nothing else (bench/ref_pyfork.py).
        echo "bench_server ref-pyfork $((PORT_BASE + 22)) --$(q "$PY_ABS" "$HERE/ref_pyfork.py" "$((PORT_BASE + 22))" "$OUTDIR/echo.py")"
    fi
    # References, not pyinetd: its exec path with nothing around it, in one loop and in two
    # processes (what a second spawning process could reach; bench/ref_twoloops.py).
    echo "bench_server ref-loop $((PORT_BASE + 18)) --$(q "$PYINETD_PYTHON" "$HERE/ref_twoloops.py" "$((PORT_BASE + 18))" 1)"
    echo "bench_server ref-2loops $((PORT_BASE + 19)) --$(q "$PYINETD_PYTHON" "$HERE/ref_twoloops.py" "$((PORT_BASE + 19))" 2)"
    # The same two in C (bench/ref_vfork.c): what this design reaches with no interpreter at all.
    echo "bench_server ref-c $((PORT_BASE + 12)) --$(q "$OUTDIR/ref_vfork" "$((PORT_BASE + 12))" 1)"
    echo "bench_server ref-c-2loops $((PORT_BASE + 13)) --$(q "$OUTDIR/ref_vfork" "$((PORT_BASE + 13))" 2)"
    if [[ -n $USER_EXTRA ]]; then
        echo "source $(printf '%q' "$(cd "$(dirname "$USER_EXTRA")" && pwd)/$(basename "$USER_EXTRA")")"
    fi
} >"$EXTRA_FILE"

# ---------------------------------------------------------------- run
CMDLINE="bench/run.sh"
for v in CONNS WARMUP CONC PAYLOAD ROUNDS FLOOR_N ONLY SKIP PYINETD_ARGS PYINETD_WORKERS PYINETD_PRIMITIVES PYINETD_PYROWS PYINETD_SANDBOX; do
    [[ -n ${!v:-} ]] && CMDLINE="$v=$(printf '%q' "${!v}") $CMDLINE"
done
note "outdir $OUTDIR"
export PORT_BASE
EXTRA=$EXTRA_FILE OUTDIR=$OUTDIR bash "$ANCHORS" 2>&1 | tee "$OUTDIR/anchors.txt"
[[ -s $OUTDIR/results.tsv ]] || die "anchors.sh wrote no results ($OUTDIR/results.tsv)"

# The interpreter's own start-up RSS, for reading pyinetd's: .pth files in site-packages
# (run by the site module) can import a good deal before pyinetd's first line.
rss_probe='print([ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmRSS:")][0])'
PY_RSS=$("$PYINETD_PYTHON" -c "$rss_probe" 2>/dev/null || echo NA)
PY_RSS_NOSITE=$("$PYINETD_PYTHON" -S -c "$rss_probe" 2>/dev/null || echo NA)

"$REPORT_PYTHON" "$HERE/report.py" "$OUTDIR/results.tsv" --log "$OUTDIR/anchors.txt" \
    --out "$RESULTS_DIR" --command "$CMDLINE" --python-rss "$PY_RSS,$PY_RSS_NOSITE"

if [[ $SCALE == 1 ]]; then
    read -r -a sargs <<<"$SCALE_ARGS"
    "$REPORT_PYTHON" "$HERE/scale.py" --python "$PYINETD_PYTHON" --outdir "$OUTDIR/scale" --rounds "${ROUNDS:-3}" \
        --shared "$SHARED" --md "$RESULTS_DIR/latest.md" ${pyargs[@]+"--pyinetd-args=$PYINETD_ARGS"} \
        ${sargs[@]+"${sargs[@]}"}
fi
note "report: $RESULTS_DIR/latest.md $RESULTS_DIR/latest.png  raw: $OUTDIR"
