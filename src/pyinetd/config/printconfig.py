"""``--print-config``: a loaded ``Config`` -> the configuration mapping in the input
vocabulary (defaults applied, includes merged, keys at their default left out), which
writer.py writes as YAML, TOML or JSON and which loads to an equal ``Config``.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from pyinetd.config import Config, Service, keys
from pyinetd.config.inputform import number

__all__ = ["to_dict"]


def _plain(name: str, value: Any) -> Any:
    """A stored value that is its own input form (text, number, true/false, a list of them)."""
    if isinstance(value, str | int | float | bool):
        return number(value) if isinstance(value, float) else value
    if isinstance(value, tuple) and all(isinstance(v, str | int | float | bool) for v in value):
        return list(value)
    raise TypeError(f"to_dict: no input form for {name}={value!r}; give its key an out= (keys.py)")


# Field -> how its stored value is written back (the `out` of the key that fills it).
_SERVICE_OUT = {k.target: k.out for k in keys.SERVICE_KEYS.values() if k.out and k.target}
_TOP_OUT = {k.target: k.out for k in keys.TOP_KEYS.values() if k.out and k.target}


def _service_to_dict(svc: Service) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(Service):
        if f.name in ("name", "source", "exec_first_line"):
            continue
        value = getattr(svc, f.name)
        if value == f.default:
            continue
        convert = _SERVICE_OUT.get(f.name)
        out.update(convert(f.name, value) if convert else {f.name: _plain(f.name, value)})
    return out


def to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved configuration in the input vocabulary: defaults applied to each service,
    paths absolute, includes merged, keys at their default left out. It loads to an equal Config
    (apart from ``path`` and each service's ``source``)."""
    out: dict[str, Any] = {}
    for f in fields(Config):
        if f.name in ("path", "services", "raw", "marks", "include", "failed", "notes", "warnings"):
            continue
        value = getattr(cfg, f.name)
        if value != f.default:
            convert = _TOP_OUT.get(f.name)
            out.update(convert(f.name, value) if convert else {f.name: _plain(f.name, value)})
    out["services"] = {svc.name: _service_to_dict(svc) for svc in cfg.services}
    return out
