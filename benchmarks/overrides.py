"""``KEY=VALUE`` command-line overrides shared by the benchmarks (``--set``, ``--rewrite-set``, ...)."""

from __future__ import annotations

from typing import Any

import yaml


def parse_overrides(pairs: list[str], what: str = "") -> dict[str, Any]:
    """``KEY=VALUE`` strings to a dict. Values are read with ``yaml.safe_load`` (``1e-3``, ``true``, ``[a]``);
    ``a.b=1`` sets key ``b`` of the nested section ``a``. `what` names the option in errors (``rewrite`` ->
    ``--rewrite-set``)."""
    option = f"--{what}-set" if what else "--set"
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"{option} expects KEY=VALUE, got {pair!r}")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):
            try:
                parsed = float(parsed)  # YAML 1.1 reads "1e-3" (no dot) as a string
            except ValueError:
                pass
        section, _, sub = key.strip().partition(".")
        if sub:
            out.setdefault(section, {})[sub] = parsed
        else:
            out[section] = parsed
    return out
