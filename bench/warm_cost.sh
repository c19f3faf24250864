#!/usr/bin/env bash
# bench/warm_cost.sh PORT [N] [LOADGEN] - where a connection's CPU goes, for a pyinetd listening on
# 127.0.0.1:PORT (a warm service, or any other): per connection, the CPU of pyinetd itself, of its
# warm services' zygotes, and of the children it reaped (CLONE_PARENT makes a zygote's forks
# pyinetd's children), and the children's minor page faults (copy-on-write after a fork counts
# here). Runs N connections (default 3000, 128 in flight, 64-byte echo) with the shared kit's
# load generator (LOADGEN, default: built from ../shared/bench/loadgen.c into /tmp).
# Figures are noisy on a shared machine: compare rows measured one after the other.
set -euo pipefail
port=${1:?usage: warm_cost.sh PORT [N] [LOADGEN]}
n=${2:-3000}
here=$(cd "$(dirname "$0")" && pwd)
lg=${3:-/tmp/pyinetd-loadgen}
[[ -x $lg ]] || gcc -O2 -o "$lg" "$here/../../shared/bench/loadgen.c"
ppid=$(ss -ltnpH "sport = :$port" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2)
[[ -n $ppid ]] || { echo "nothing listens on $port" >&2; exit 2; }
zygotes=$(pgrep -P "$ppid" -f pyinetd-zygote || true)
# /proc/PID/stat: 10 minflt, 11 cminflt, 14 utime, 15 stime, 16 cutime, 17 cstime (ticks)
stat() { awk '{print $14+$15, $16+$17, $11, $10}' "/proc/$1/stat"; }
zsum() { local c=0 f=0 z a b; for z in $zygotes; do read -r a _ _ b < <(stat "$z"); c=$((c+a)); f=$((f+b)); done; echo "$c $f"; }
read -r p1 c1 f1 _ < <(stat "$ppid"); read -r z1 zf1 < <(zsum)
out=$("$lg" 127.0.0.1 "$port" "$n" 128 64 30)
read -r p2 c2 f2 _ < <(stat "$ppid"); read -r z2 zf2 < <(zsum)
hz=$(getconf CLK_TCK)
echo "$out"
python3 - "$n" "$hz" "$p1" "$p2" "$z1" "$z2" "$c1" "$c2" "$f1" "$f2" "$zf1" "$zf2" <<'PY'
import sys
n, hz, p1, p2, z1, z2, c1, c2, f1, f2, zf1, zf2 = map(int, sys.argv[1:])
ms = lambda a, b: (b - a) / hz / n * 1e3
print(f"per connection: pyinetd {ms(p1, p2):.3f} ms, zygotes {ms(z1, z2):.3f} ms "
      f"({(zf2 - zf1) / n:.0f} faults), children {ms(c1, c2):.3f} ms ({(f2 - f1) / n:.0f} faults) CPU")
PY
