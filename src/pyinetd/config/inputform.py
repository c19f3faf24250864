"""A stored value back in its input form, as it is written in the file again: each key's
``out`` (keyspec.Key), {key: input form}, for --print-config and ``pyinetd convert``
(durations in their unit, rates as '100/s', modes in octal, limits by name). Pure module.
"""

from __future__ import annotations

import dataclasses
import grp
import resource
from pathlib import Path
from typing import Any

from pyinetd.config.access import AccessList
from pyinetd.config.parsers import RLIMITS, Out, TLSSettings
from pyinetd.config.units import format_duration, format_rate
from pyinetd.sandbox import SandboxSettings


def number(value: float) -> int | float:
    """30.0 -> 30 (as people write it); other floats exactly as they are."""
    return int(value) if float(value).is_integer() and abs(value) < 2**53 else value


def _number_out(name: str, value: float) -> dict[str, Any]:
    return {name: number(value)}


def _duration_out(name: str, value: float) -> dict[str, Any]:
    """A duration in its unit, as people write it: timeout: 5 minutes -> '5m' (not 300)."""
    text = format_duration(value)
    return {name: text if isinstance(text, str) else number(text)}


def _listen_out(name: str, value: tuple[Any, ...]) -> dict[str, Any]:
    return {name: str(value[0]) if len(value) == 1 else [str(a) for a in value]}


def _argv_out(name: str, value: tuple[str, ...]) -> dict[str, Any]:
    return {name: list(getattr(value, "given", value))}


def _access_times_out(name: str, value: tuple[tuple[int, int], ...]) -> dict[str, Any]:
    return {name: " ".join(f"{a // 60:02}:{a % 60:02}-{b // 60:02}:{b % 60:02}" for a, b in value)}


def _group_out(name: str, value: int) -> dict[str, Any]:
    """A group as a name (nogroup, not 65534), the number only when it has none."""
    try:
        return {name: grp.getgrgid(value).gr_name}
    except KeyError:
        return {name: value}


def _dict_out(name: str, value: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    return {name: dict(value)}


def _name_out(name: str, value: tuple[str, int, int]) -> dict[str, Any]:
    return {name: value[0]}


def _octal_out(digits: int) -> Out:
    def out(name: str, value: int) -> dict[str, Any]:
        return {name: f"{value:0{digits}o}"}

    return out


def _banner_out(_name: str, value: bytes) -> dict[str, Any]:
    try:
        return {"banner_text": value.decode("utf-8")}
    except UnicodeDecodeError:
        # banner_text is encoded as UTF-8 on the way in; other bytes have no text form.
        raise ValueError("banner: the file is not UTF-8 text and cannot be shown inline") from None


def _rate_out(_name: str, value: tuple[float, int]) -> dict[str, Any]:
    per_second, burst = value
    out: dict[str, Any] = {"rate": format_rate(per_second)}
    if burst != max(1, int(per_second)):  # parse_rate's default burst
        out["burst"] = burst
    return out


def _tls_out(name: str, value: TLSSettings) -> dict[str, Any]:
    """The tls: mapping: files as paths, a duration in its unit, what is at its default left
    out (a tls: service made --print-config fail: TLSSettings has no text form of its own)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(value):
        v = getattr(value, f.name)
        if v is None or v == f.default:
            continue
        if isinstance(v, Path):
            out[f.name] = str(v)
        elif isinstance(v, float):
            out.update(_duration_out(f.name, v))
        else:
            out[f.name] = v
    return {name: out}


def _access_out(_name: str, value: AccessList) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if value.allow:
        out["allow"] = [str(n) for n in value.allow]
    if value.deny:
        out["deny"] = [str(n) for n in value.deny]
    return out


_RLIMIT_NAMES = {number: name for name, number in RLIMITS.items()}


def _rlimits_out(name: str, value: tuple[tuple[int, int], ...]) -> dict[str, Any]:
    return {
        name: {
            _RLIMIT_NAMES[res]: "unlimited" if n == resource.RLIM_INFINITY else n
            for res, n in value
        }
    }


def _stderr_rate_out(name: str, value: tuple[float, float]) -> dict[str, Any]:
    return {name: {"lines": format_rate(value[0]), "bytes": number(value[1])}}


def _sandbox_out(name: str, value: SandboxSettings) -> dict[str, Any]:
    return {name: value.to_dict()}
