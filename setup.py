"""Build step for the one C module; all metadata is in pyproject.toml.

pyinetd._spawn (src/pyinetd/spawn/_spawn.c) is pyinetd's vfork spawn primitive. It is optional:
where it cannot be built (no compiler or Python headers), the install goes on and pyinetd
starts services with CPython's own _posixsubprocess.fork_exec instead.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("pyinetd._spawn", sources=["src/pyinetd/spawn/_spawn.c"], optional=True),
    ]
)
