#!/usr/bin/env bash
# The sdist tests itself: build it, unpack it in a temporary folder, install it from there with
# its test dependencies and run part of the suite from the unpacked tree. CI runs the whole
# suite once from the checkout; this shows the sdist alone has every file the tests need.
#
#   bash scripts/test-sdist.sh [PYTEST ARGS]   # default: a subset that takes seconds
set -euo pipefail
cd "$(dirname "$0")/.."
# `build` comes with the test extras (scripts/test.sh installs them into .venv).
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# From a copy without the egg-info that `pip install -e` leaves: setuptools would take its
# SOURCES.txt as a list of files to ship and so hide a file MANIFEST.in forgets.
mkdir "$work/tree"
tar --exclude=.git --exclude=.venv --exclude='*.egg-info' --exclude=build --exclude=dist \
    --exclude=__pycache__ --exclude='.*_cache' --exclude='*.so' -cf - . | tar -xf - -C "$work/tree"
"$PYTHON" -m build --sdist --outdir "$work/dist" "$work/tree" >/dev/null
tar -xzf "$work"/dist/pyinetd-*.tar.gz -C "$work"
src=$(echo "$work"/pyinetd-*/)

python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$src[test]"
# The man pages install under the prefix, where man(1) finds them from PATH.
test -f "$work/venv/share/man/man8/pyinetd.8" && test -f "$work/venv/share/man/man5/pyinetd.yaml.5"
if command -v man >/dev/null; then PATH="$work/venv/bin:$PATH" man -w pyinetd pyinetd.yaml >/dev/null; fi
cd "$src"
if [ $# -eq 0 ]; then
    set -- tests/test_config.py tests/test_schema.py tests/test_convert.py \
        tests/test_packaging.py tests/test_server.py::test_services_script_end_to_end_with_nc
fi
"$work/venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
