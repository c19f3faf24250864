"""Turn the bench kit's results.tsv into bench/results/latest.md and latest.png.

usage: report.py RESULTS_TSV [--log anchors.txt] [--out bench/results] [--command TEXT]

results.tsv has one row per run, written by ../shared/bench/anchors.sh (run_one):
name kind round status ok fail rate p50_ms p99_ms max_ms z_end z_own z_settled kids rss_kB
cpu_own_ms/1k cpu_tree_ms/1k loadgen-line. Runs that never started (port-busy, not-ready) have
only the first four columns. Figures are medians over the runs whose status is "ok".
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# The targets. Exec rows are compared with tcpserver (the fastest exec anchor on
# this kind of machine, and the one whose design pyinetd's spawn path resembles); built-in
# echo rows with xinetd's internal echo.
EXEC_REF = "tcpserver"
INTERNAL_REF = "xinetd-echo"
RATE_TARGET = 1.0
RATE_STRETCH = 1.10
ECHO_TARGET = 1.5
RSS_LIMIT_KB = 20 * 1024  # VmRSS is in KiB; "20 MB" is read as 20 MiB


@dataclass(frozen=True)
class Run:
    """One row of results.tsv."""

    name: str
    kind: str
    round: int
    status: str
    ok: int | None = None
    fail: int | None = None
    rate: float | None = None
    p50: float | None = None
    p99: float | None = None
    max_ms: float | None = None
    z_end: int | None = None
    z_own: int | None = None
    z_set: int | None = None
    kids: int | None = None
    rss_kb: float | None = None
    cpu_own: float | None = None
    cpu_tree: float | None = None


@dataclass(frozen=True)
class Summary:
    """Medians (and worst zombie counts) of one server's good runs."""

    name: str
    kind: str
    runs: int
    good: int
    ok: int
    fail: int
    rate: float | None
    rate_min: float | None
    rate_max: float | None
    p50: float | None
    p99: float | None
    rss_kb: float | None
    z_end: int | None
    z_own: int | None
    z_set: int | None
    kids: int | None
    cpu_own: float | None
    cpu_tree: float | None
    bad: tuple[str, ...]


@dataclass(frozen=True)
class Target:
    """One of the issue's goals and whether this run met it."""

    goal: str
    measured: str
    verdict: str  # PASS | FAIL | n/a


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def parse_results(text: str) -> list[Run]:
    """Parse results.tsv text into runs; short rows are runs that never started."""
    runs: list[Run] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        f = line.split("\t")
        if len(f) < 4:
            continue
        name, kind, rnd, status = f[0], f[1], _int(f[2]) or 0, f[3]
        if len(f) < 17:
            runs.append(Run(name, kind, rnd, status))
            continue
        runs.append(
            Run(
                name,
                kind,
                rnd,
                status,
                ok=_int(f[4]),
                fail=_int(f[5]),
                rate=_float(f[6]),
                p50=_float(f[7]),
                p99=_float(f[8]),
                max_ms=_float(f[9]),
                z_end=_int(f[10]),
                z_own=_int(f[11]),
                z_set=_int(f[12]),
                kids=_int(f[13]),
                rss_kb=_float(f[14]),
                cpu_own=_float(f[15]),
                cpu_tree=_float(f[16]),
            )
        )
    return runs


def _median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _worst(values: Sequence[int | None]) -> int | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def summarise(runs: Sequence[Run]) -> list[Summary]:
    """One summary per server, in the order the servers first appear."""
    names = list(dict.fromkeys(r.name for r in runs))
    out: list[Summary] = []
    for name in names:
        rs = [r for r in runs if r.name == name]
        good = [r for r in rs if r.status == "ok"]
        rates = [r.rate for r in good if r.rate is not None]
        out.append(
            Summary(
                name=name,
                kind=rs[0].kind,
                runs=len(rs),
                good=len(good),
                ok=sum(r.ok or 0 for r in good),
                fail=sum(r.fail or 0 for r in good),
                rate=_median(rates),
                rate_min=min(rates) if rates else None,
                rate_max=max(rates) if rates else None,
                p50=_median([r.p50 for r in good]),
                p99=_median([r.p99 for r in good]),
                rss_kb=_median([r.rss_kb for r in good]),
                z_end=_worst([r.z_end for r in good]),
                z_own=_worst([r.z_own for r in good]),
                z_set=_worst([r.z_set for r in good]),
                kids=_worst([r.kids for r in good]),
                cpu_own=_median([r.cpu_own for r in good]),
                cpu_tree=_median([r.cpu_tree for r in good]),
                bad=tuple(r.status for r in rs if r.status != "ok"),
            )
        )
    return out


def reference_for(s: Summary) -> str:
    """The anchor a server's ratio is taken against."""
    return INTERNAL_REF if s.kind == "internal" else EXEC_REF


def ratio(s: Summary, by_name: dict[str, Summary]) -> float | None:
    """Median conn/s of s over that of its reference anchor."""
    ref = by_name.get(reference_for(s))
    if ref is None or not ref.rate or s.rate is None:
        return None
    return s.rate / ref.rate


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def evaluate_targets(summaries: Sequence[Summary]) -> list[Target]:
    """The issue's targets, evaluated for every pyinetd row that ran."""
    by = {s.name: s for s in summaries}
    ref, echo_ref = by.get(EXEC_REF), by.get(INTERNAL_REF)
    ref_rate = ref.rate if ref else None
    ref_p99 = ref.p99 if ref else None
    echo_ref_rate = echo_ref.rate if echo_ref else None
    out: list[Target] = []
    exec_rows = [s for s in summaries if s.name.startswith("pyinetd") and s.kind == "exec"]
    if not exec_rows:
        out.append(Target(f"pyinetd conn/s >= {RATE_TARGET:.2f}x {EXEC_REF}", "-", "n/a"))
    for s in exec_rows:
        r = ratio(s, by)
        shown = "-" if r is None else f"{r:.2f}x ({_fmt(s.rate, 0)} vs {_fmt(ref_rate, 0)})"
        out.append(
            Target(
                f"{s.name} conn/s >= {RATE_TARGET:.2f}x {EXEC_REF}",
                shown,
                _verdict(None if r is None else r >= RATE_TARGET),
            )
        )
        out.append(
            Target(
                f"{s.name} conn/s >= {RATE_STRETCH:.2f}x {EXEC_REF} (stretch)",
                shown,
                _verdict(None if r is None else r >= RATE_STRETCH),
            )
        )
        p99_ok = None if s.p99 is None or ref_p99 is None else s.p99 <= ref_p99
        out.append(
            Target(
                f"{s.name} p99 <= {EXEC_REF} p99",
                f"{_fmt(s.p99, 2)} ms vs {_fmt(ref_p99, 2)} ms",
                _verdict(p99_ok),
            )
        )
    echo = by.get("pyinetd-echo")
    r = None if echo is None else ratio(echo, by)
    out.append(
        Target(
            f"pyinetd-echo conn/s >= {ECHO_TARGET:.1f}x {INTERNAL_REF}",
            "-"
            if r is None or echo is None
            else f"{r:.2f}x ({_fmt(echo.rate, 0)} vs {_fmt(echo_ref_rate, 0)})",
            _verdict(None if r is None else r >= ECHO_TARGET),
        )
    )
    for s in summaries:
        if s.name.startswith("pyinetd"):
            out.append(
                Target(
                    f"{s.name} parent RSS <= {RSS_LIMIT_KB // 1024} MiB",
                    "-" if s.rss_kb is None else f"{s.rss_kb / 1024:.1f} MiB",
                    _verdict(None if s.rss_kb is None else s.rss_kb <= RSS_LIMIT_KB),
                )
            )
    return out


def _fmt(v: float | None, places: int = 1) -> str:
    return "-" if v is None else f"{v:.{places}f}"


def header_lines(log: str) -> list[str]:
    """The kit's '# ...' lines (date, host, knobs, versions, exec floor, skips)."""
    keep = ("# anchors.sh", "# conns=", "# versions", "# floor=", "# skipped")
    return [ln for ln in log.splitlines() if ln.startswith(keep)]


def render_markdown(
    summaries: Sequence[Summary],
    targets: Sequence[Target],
    header: Sequence[str],
    command: str,
    python_rss: tuple[float | None, float | None] = (None, None),
) -> str:
    """The whole latest.md, anchors table and targets."""
    by = {s.name: s for s in summaries}
    out = ["# pyinetd benchmark: latest run", ""]
    if command:
        out += [f"Command: `{command}`", ""]
    if header:
        out += ["```", *header, "```", ""]
    out += [
        "| server | kind | runs ok | median conn/s | min..max | p50 ms | p99 ms | RSS MiB "
        "| zombies end/own/settled | kids left | parent CPU ms/1k | tree CPU ms/1k | ratio | vs |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for s in summaries:
        r = ratio(s, by)
        span = "-" if s.rate_min is None else f"{s.rate_min:.0f}..{s.rate_max:.0f}"
        zs = "/".join("-" if z is None else str(z) for z in (s.z_end, s.z_own, s.z_set))
        name = f"**{s.name}**" if s.name.startswith("pyinetd") else s.name
        out.append(
            f"| {name} | {s.kind} | {s.good}/{s.runs} | {_fmt(s.rate)} | {span} "
            f"| {_fmt(s.p50, 2)} | {_fmt(s.p99, 2)} "
            f"| {'-' if s.rss_kb is None else f'{s.rss_kb / 1024:.1f}'} | {zs} "
            f"| {'-' if s.kids is None else s.kids} | {_fmt(s.cpu_own)} | {_fmt(s.cpu_tree)} "
            f"| {'-' if r is None else f'{r:.2f}'} | {reference_for(s)} |"
        )
    failed = [s for s in summaries if s.bad or s.fail]
    if failed:
        out.append("")
        for s in failed:
            out.append(
                f"- {s.name}: {s.fail} failed connections in good runs; "
                f"runs not ok: {', '.join(s.bad) or 'none'}"
            )
    out += [
        "",
        "## Targets",
        "",
        "| target | measured | result |",
        "|---|---|---|",
        *[f"| {t.goal} | {t.measured} | {t.verdict} |" for t in targets],
        "",
    ]
    with_site, no_site = python_rss
    if with_site is not None:
        out += [
            f"Interpreter baseline: `python -c pass` has VmRSS {with_site / 1024:.1f} MiB"
            + ("" if no_site is None else f" ({no_site / 1024:.1f} MiB with `-S`, i.e. without")
            + ("" if no_site is None else " the site module and its .pth hooks)")
            + "; every Python row's RSS includes it.",
            "",
        ]
    out += [
        "Medians over rounds. conn/s: connections that connected, echoed the payload and closed,",
        "per second of wall time, CONC in flight. p50/p99: connect() to last echoed byte.",
        "RSS: VmRSS of the server's own pid after the run. zombies: system-wide right after the",
        "run / of them the server's own children / system-wide after a 3 s settle (worst round).",
        "parent CPU: user+system time of the server's own pid per 1000 connections; tree CPU adds",
        "its reaped children's (the services): the whole cost of serving, which on a CPU-bound",
        "machine sets the ceiling, while idle CPU (a parent blocked in vfork) is what keeps a",
        "server below it. ratio: median",
        f"conn/s over {EXEC_REF}'s (exec rows) or {INTERNAL_REF}'s (internal rows). Absolute",
        "figures on a shared machine are noise; read the ratios.",
        "",
    ]
    return "\n".join(out)


def plot(summaries: Sequence[Summary], path: Path) -> None:
    """Two panels, conn/s and p99 per server, bars coloured by exec/internal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = [s for s in summaries if s.rate is not None]
    names = [s.name for s in rows]
    colours = ["tab:orange" if s.kind == "internal" else "tab:blue" for s in rows]
    hatches = ["//" if s.name.startswith("pyinetd") else "" for s in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, max(3.5, 0.45 * len(rows) + 1.5)))
    ypos = list(range(len(rows)))
    lo = [(s.rate or 0) - (s.rate_min or s.rate or 0) for s in rows]
    hi = [(s.rate_max or s.rate or 0) - (s.rate or 0) for s in rows]
    bars1 = ax1.barh(ypos, [s.rate or 0 for s in rows], color=colours, xerr=[lo, hi])
    bars2 = ax2.barh(ypos, [s.p99 or 0 for s in rows], color=colours)
    for bars in (bars1, bars2):
        for bar, hatch in zip(bars, hatches, strict=True):
            bar.set_hatch(hatch)
            bar.set_edgecolor("black" if hatch else "none")
    by = {s.name: s for s in summaries}
    ref = by.get(EXEC_REF)
    if ref is not None and ref.rate:
        ax1.axvline(ref.rate, color="grey", linestyle="--", linewidth=1)
    if ref is not None and ref.p99:
        ax2.axvline(ref.p99, color="grey", linestyle="--", linewidth=1)
    for ax, title in ((ax1, "connections/s (median, min..max)"), (ax2, "p99 latency, ms")):
        ax.set_yticks(ypos)
        ax.set_yticklabels(names)
        ax.invert_yaxis()
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    ax2.set_yticklabels([])
    ax1.bar_label(bars1, labels=[f"{s.rate:.0f}" for s in rows], padding=3, fontsize="small")
    ax2.bar_label(bars2, labels=[_fmt(s.p99) for s in rows], padding=3, fontsize="small")
    for ax in (ax1, ax2):
        ax.margins(x=0.15)
    fig.legend(
        handles=[
            Patch(color="tab:blue", label="exec /bin/cat per connection"),
            Patch(color="tab:orange", label="internal echo (execs nothing)"),
            Patch(facecolor="white", edgecolor="black", hatch="//", label="pyinetd"),
        ],
        loc="lower center",
        ncol=3,
        fontsize="small",
    )
    fig.suptitle(f"inetd-style servers on 127.0.0.1 (dashed line: {EXEC_REF})")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Write latest.md and latest.png from a results.tsv."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--log", type=Path, help="anchors.sh output, for its '# ...' header lines")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--command", default="", help="the command line, shown in the report")
    ap.add_argument(
        "--python-rss", default="", help="KB,KB: VmRSS of `python -c pass` and `python -S -c pass`"
    )
    args = ap.parse_args(argv)

    runs = parse_results(args.results.read_text())
    if not runs:
        print(f"report.py: no runs in {args.results}", file=sys.stderr)
        return 1
    summaries = summarise(runs)
    targets = evaluate_targets(summaries)
    header = header_lines(args.log.read_text()) if args.log and args.log.exists() else []
    args.out.mkdir(parents=True, exist_ok=True)
    rss = [_float(x) for x in args.python_rss.split(",")] if args.python_rss else []
    python_rss = (rss[0] if rss else None, rss[1] if len(rss) > 1 else None)
    md = render_markdown(summaries, targets, header, args.command, python_rss)
    (args.out / "latest.md").write_text(md)
    plot(summaries, args.out / "latest.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
