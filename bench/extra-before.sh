# EXTRA file for bench/run.sh: pyinetd as it was at another commit (BEFORE_PYTHON: a venv with that
# commit installed), the same /bin/cat and echo services, as rows pyinetd-before and pyinetd-echo-before,
# the warm Python echo service as py-warm-before, and the sandboxed one as sandbox-before.
cat >"$OUTDIR/before-cat.yaml" <<EOT
services:
  cat: {listen: "127.0.0.1:$((PORT_BASE + 20))", exec: [/bin/cat]}
EOT
cat >"$OUTDIR/before-echo.yaml" <<EOT
services:
  echo: {listen: "127.0.0.1:$((PORT_BASE + 21))", builtin: echo, per_source: 1000}
EOT
bench_server pyinetd-before $((PORT_BASE + 20)) -- "${BEFORE_PYTHON:?set BEFORE_PYTHON to an interpreter with the older pyinetd}" -m pyinetd -c "$OUTDIR/before-cat.yaml"
bench_server pyinetd-echo-before $((PORT_BASE + 21)) internal -- "${BEFORE_PYTHON:?set BEFORE_PYTHON to an interpreter with the older pyinetd}" -m pyinetd -c "$OUTDIR/before-echo.yaml"
# The warm Python echo service (run.sh's py-warm) with the older pyinetd, as py-warm-before.
if [[ -s $OUTDIR/echo.py ]]; then
    BEFORE_EXE=$("$BEFORE_PYTHON" -c 'import sys; print(sys.executable)')
    printf 'services:\n  py: {listen: "127.0.0.1:%s", exec: [%s, %s/echo.py], warm: true}\n' \
        "$((PORT_BASE + 23))" "$BEFORE_EXE" "$OUTDIR" >"$OUTDIR/before-py-warm.yaml"
    bench_server py-warm-before $((PORT_BASE + 23)) -- "$BEFORE_PYTHON" -m pyinetd -c "$OUTDIR/before-py-warm.yaml" --log-level warning
fi
# The /bin/cat service with the full sandbox (run.sh's pyinetd-sandbox) with the older pyinetd, as
# sandbox-before (root only, as that row).
if [[ -s $OUTDIR/pyinetd-sandbox.yaml ]]; then
    sed "s/127.0.0.1:$((PORT_BASE + 14))/127.0.0.1:$((PORT_BASE + 24))/" \
        "$OUTDIR/pyinetd-sandbox.yaml" >"$OUTDIR/before-sandbox.yaml"
    bench_server sandbox-before $((PORT_BASE + 24)) -- "$BEFORE_PYTHON" -m pyinetd -c "$OUTDIR/before-sandbox.yaml"
fi
