"""Units: durations, rates and sizes as people write them -> numbers, and back. Pure.

The parsers accept whatever YAML or TOML produced and raise ``ValueError`` with a message of the
form ``'<value>': <what was expected>``, so the config layer can prefix it with the file and key
path.
"""

from __future__ import annotations

import math
import re
import resource
from fractions import Fraction

__all__ = [
    "DURATION_UNITS",
    "RATE_UNITS",
    "format_duration",
    "format_rate",
    "parse_duration",
    "parse_rate",
    "parse_size",
]

# ---------------------------------------------------------------- rates

RATE_UNITS = {
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600.0),
}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_RATE_RE = re.compile(rf"({_NUMBER})\s*(?:/\s*([a-z]+))?")


def parse_rate(text: str | int | float) -> tuple[float, int]:
    """'50/s' -> (50.0 per second, default burst max(1, int(rate))); also /min, /m, /h."""
    rate: float | None = None
    if isinstance(text, bool):
        pass  # YAML `rate: yes` is a mistake, not 1/s
    elif isinstance(text, int | float):
        rate = float(text)  # a bare number: per second
    elif isinstance(text, str):
        match = _RATE_RE.fullmatch(text.strip().lower())
        if match is not None and (match.group(2) or "s") in RATE_UNITS:
            rate = float(match.group(1)) / RATE_UNITS[match.group(2) or "s"]
    if rate is None or not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"{text!r}: expected a positive rate such as '50/s', '600/min' or '100/h'")
    return rate, max(1, int(rate))


def format_rate(per_second: float) -> str | float:
    """parse_rate's inverse, for --print-config: 100/60 -> '100/min', 50.0 -> '50/s'; a rate
    that is no whole count per second, minute or hour stays a number (per second)."""
    for unit, seconds in (("s", 1.0), ("min", 60.0), ("h", 3600.0)):
        n = round(per_second * seconds)
        if n >= 1 and parse_rate(f"{n}/{unit}")[0] == per_second:
            return f"{n}/{unit}"
    return per_second


# ---------------------------------------------------------------- durations and sizes

DURATION_UNITS = {
    **RATE_UNITS,
    "": 1.0,
    "ms": 0.001,
    **dict.fromkeys(("d", "day", "days"), 86400.0),
}
_DURATION_RE = re.compile(rf"({_NUMBER})\s*([a-z]*)")


def parse_duration(text: str | int | float) -> float:
    """Seconds from 30, 1.5, '30', '30s', '500ms', '5m', '1h', '1d'; ValueError on junk."""
    seconds: float | None = None
    if isinstance(text, bool):
        pass  # YAML `timeout: yes` is a mistake, not 1 second
    elif isinstance(text, int | float):
        seconds = float(text)
    elif isinstance(text, str):
        match = _DURATION_RE.fullmatch(text.strip().lower())
        if match is not None and match.group(2) in DURATION_UNITS:
            seconds = float(match.group(1)) * DURATION_UNITS[match.group(2)]
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{text!r}: expected a duration >= 0 such as 30, '30s', '500ms' or '5m'")
    return seconds


# The units --print-config writes a duration in, largest first ('m' is minutes, as '5m').
_DURATION_OUT = (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 0.001))


def format_duration(seconds: float) -> str | float:
    """parse_duration's inverse, for --print-config: a duration as people write it, in the
    largest unit of which it is a whole number: 300.0 -> '5m', 90.0 -> '90s', 0.5 -> '500ms',
    0.0 -> '0s'; else in seconds with their fraction, 1.5 -> '1.5s'. A value no such text gives
    back exactly stays a number (seconds)."""
    if seconds == 0:
        return "0s"
    for unit, size in _DURATION_OUT:
        n = round(seconds / size)
        if n >= 1 and parse_duration(f"{n}{unit}") == seconds:
            return f"{n}{unit}"
    text = f"{seconds!r}s"
    try:
        return text if parse_duration(text) == seconds else seconds
    except ValueError:  # 1e-05: no exponent in a duration's text
        return seconds


_SIZE_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_SIZE_RE = re.compile(rf"({_NUMBER})\s*([kmgtp]?)(?:i?b)?")
_UNLIMITED = frozenset({"unlimited", "infinity"})
# resource.setrlimit() converts through a signed C long long: anything larger raises OverflowError
# at spawn time, so refuse it here, where the config error can name the key.
_MAX_RLIM = 2**63 - 1


def parse_size(text: str | int) -> int:
    """An rlimit value: 100, '64k', '512M', '1G' (powers of 1024), 'unlimited' -> RLIM_INFINITY."""
    size: Fraction | None = None
    if isinstance(text, bool):
        pass  # YAML `core: no` is a mistake, not 0 bytes
    elif isinstance(text, int):
        size = Fraction(text)
    elif isinstance(text, str):
        lowered = text.strip().lower()
        if lowered in _UNLIMITED:
            return resource.RLIM_INFINITY
        match = _SIZE_RE.fullmatch(lowered)
        if match is not None and len(match.group(1)) <= 64:  # int() refuses >4300 digits anyway
            # Fraction, not float: "1.5G" must be exactly 1610612736, not off by rounding.
            size = Fraction(match.group(1)) * 1024 ** _SIZE_UNITS[match.group(2)]
    # A fractional number of bytes ("0.3k") is a mistake, not something to round silently.
    if size is None or size < 0 or size.denominator != 1 or size > _MAX_RLIM:
        raise ValueError(
            f"{text!r}: expected a whole size such as 100, '64k', '512M', '1G' or 'unlimited'"
        )
    return int(size)
