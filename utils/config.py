"""`--name value` overrides for the config block at the top of each script.

A script's config is its module-level variables of plain types; every one of them is a flag of the
same name. Values are parsed by the type of the default, so a typo fails before any work starts.
"""
from __future__ import annotations

import sys
from typing import Any, Mapping, Sequence

from .errors import UserError

_PLAIN = (bool, int, float, str, list, tuple, type(None))
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def config_block(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The plain-typed, non-underscore module variables of a script: its config block."""
    return {k: v for k, v in namespace.items() if not k.startswith("_") and isinstance(v, _PLAIN)}


def _parse_scalar(name: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise UserError(f"--{name} expects true or false, got {text!r}")
    if isinstance(default, (int, float)):
        try:
            return type(default)(text) if not (isinstance(default, int) and "." in text) else float(text)
        except ValueError:
            raise UserError(f"--{name} expects a number, got {text!r}") from None
    if default is None:  # None defaults mean "decide for me"; accept the literal spellings too
        lowered = text.lower()
        if lowered in ("none", "null", "auto"):
            return None
        if lowered in _TRUE | _FALSE:
            return lowered in _TRUE
    return text


def parse_overrides(config: dict[str, Any], argv: Sequence[str] | None = None) -> dict[str, Any]:
    """A copy of `config` with `--name value` pairs applied; list-typed names take every value up to the next flag."""
    args = list(sys.argv[1:] if argv is None else argv)
    out = dict(config)
    i = 0
    while i < len(args):
        flag = args[i]
        if not flag.startswith("--") or len(flag) == 2:
            raise UserError(f"expected --name value, got {flag!r}")
        name, _, inline = flag[2:].partition("=")
        if name not in config:
            raise UserError(f"unknown option --{name}; the options are the config variables: {', '.join(config)}")
        values = [inline] if inline else []
        i += 1
        while i < len(args) and not args[i].startswith("--") and (not values or isinstance(config[name], list)):
            values.append(args[i])
            i += 1
        if not values:
            raise UserError(f"--{name} needs a value")
        default = config[name]
        if isinstance(default, (list, tuple)):
            item = default[0] if default else ""
            out[name] = type(default)(_parse_scalar(name, v, item) for v in values)
        else:
            out[name] = _parse_scalar(name, values[0], default)
    return out
