# EXTRA file for bench/run.sh: pyinetd as it was at another commit (BEFORE_PYTHON: a venv with that
# commit installed), the same /bin/cat and echo services, as rows pyinetd-before and pyinetd-echo-before.
cat >"$OUTDIR/before-cat.yaml" <<EOT
services:
  cat: {listen: "127.0.0.1:$((PORT_BASE + 20))", exec: [/bin/cat]}
EOT
cat >"$OUTDIR/before-echo.yaml" <<EOT
services:
  echo: {listen: "127.0.0.1:$((PORT_BASE + 21))", builtin: echo}
EOT
bench_server pyinetd-before $((PORT_BASE + 20)) -- "${BEFORE_PYTHON:?set BEFORE_PYTHON to an interpreter with the older pyinetd}" -m pyinetd -c "$OUTDIR/before-cat.yaml"
bench_server pyinetd-echo-before $((PORT_BASE + 21)) internal -- "${BEFORE_PYTHON:?set BEFORE_PYTHON to an interpreter with the older pyinetd}" -m pyinetd -c "$OUTDIR/before-echo.yaml"
