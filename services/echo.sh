#!/bin/sh
# Echo as a plain program (the built-in `builtin: echo` does the same inside pyinetd, faster).
# Enable it in inetd.yaml:
#     echo-sh: {listen: 127.0.0.1:7010, exec: services/echo.sh}
# Try it: echo hello | nc -N 127.0.0.1 7010
exec cat
