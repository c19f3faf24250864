#!/usr/bin/env python3
"""A line-uppercaser: every line read from the client comes back in upper case.

Enable it in inetd.yaml:
    upper: {listen: 127.0.0.1:7008, exec: services/upper.py, warm: true}
Try it: echo hello | nc -N 127.0.0.1 7008
"""

import sys

for line in sys.stdin:
    sys.stdout.write(line.upper())
    sys.stdout.flush()
