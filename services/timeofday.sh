#!/bin/sh
# Time of day in ISO 8601, UTC (the built-in daytime answers in ctime format instead).
# Enable it in inetd.yaml:
#     timeofday: {listen: 127.0.0.1:7011, exec: services/timeofday.sh}
# Try it: nc 127.0.0.1 7011 </dev/null
date -u +%Y-%m-%dT%H:%M:%SZ
