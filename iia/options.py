"""Options declared once, as dataclass fields (`option`), and the command-line arguments made from them
(`add_options`), the flags a command line set (`given_options`), and their bounds applied to options built in
Python (`check_options`). Standard library only; re-exported by iia/cli.py, where the CLIs import them from."""

from __future__ import annotations

import argparse
from typing import Callable

# Each option is declared ONCE, as a dataclass field made by `option(...)`: its default, help, flag, bounds
# and choices. `add_options` generates the argparse arguments of every CLI that takes it; `check_options`
# applies the same bounds to options built in Python, naming the flag.


def option(default, help: str, *, flag: str | None = None, aliases: tuple[str, ...] = (), lo=None, hi=None,
           choices=None, cli: bool = True, parse: Callable[[str], object] | None = None, role: str | None = None):
    """A dataclass field carrying its command-line form (flag and aliases, help, bounds lo..hi inclusive,
    choices; cli=False: settable from Python only). parse: argparse type of a list option (int_list,
    str_list): bounds and choices then apply to each element. role: what the option sets (e.g. "fit",
    "guard", "search", "engine"; each options class lists its roles), read by the policies that refuse a
    flag the chosen path would ignore (`with_role`)."""
    from dataclasses import field

    meta = {"help": help, "flag": flag, "aliases": aliases, "lo": lo, "hi": hi, "choices": choices, "cli": cli,
            "parse": parse, "role": role}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag_of(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def with_role(cls, *roles: str) -> tuple[str, ...]:
    """Names of the `option` fields of dataclass `cls` (or of an instance) whose role is one of `roles`, in
    declaration order."""
    import dataclasses

    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("role") in roles)


def add_options(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), defaults: dict | None = None,
                only: tuple[str, ...] | None = None) -> None:
    """Add one argument per `option` field of dataclass `cls` (bool fields become on/off switches); `only`
    restricts to the named fields."""
    import dataclasses

    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", False) or f.name in skip or only is not None and f.name not in only:
            continue
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        help_text = f.metadata["help"]
        if isinstance(default, bool):
            flag = f.metadata.get("flag") or ("--no-" if default else "--") + f.name.replace("_", "-")
            parser.add_argument(flag, dest=f.name, action="store_false" if default else "store_true", help=help_text)
            continue
        kind = {int: int, float: float}.get(type(default) if default is not None else None)
        if kind is None and f.metadata.get("lo") is not None:
            kind = float if isinstance(f.metadata["lo"], float) else int
        kind = f.metadata.get("parse") or kind
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        said = default is None or f"(default {shown}" in help_text  # a help text that gives this default itself
        kwargs = {"dest": f.name, "default": default, "help": help_text + ("" if said else f" (default {shown})")}
        if f.metadata.get("choices") and not f.metadata.get("parse"):
            kwargs["choices"] = f.metadata["choices"]
        if kind is not None:
            kwargs["type"] = kind  # bounds are checked by check_options: one line naming the flag
        parser.add_argument(flag_of(f), *f.metadata.get("aliases", ()), **kwargs)


def given_options(parser: argparse.ArgumentParser, argv) -> set[str]:
    """The dests of the options `argv` sets explicitly, whatever their value (aliases included; iia's parsers
    take no abbreviations): argparse fills a default only where the namespace lacks the attribute, so a namespace
    pre-filled with a marker keeps the marker exactly where nothing was given."""
    marker = object()
    namespace = argparse.Namespace(**{a.dest: marker for a in parser._actions if a.dest != "help"})
    parser.parse_args(argv, namespace=namespace)
    return {dest for dest, value in vars(namespace).items() if value is not marker}


def options_from(cls, args: argparse.Namespace, **extra):
    """An instance of dataclass `cls` from parsed arguments (fields the parser lacks keep their defaults)."""
    import dataclasses

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(extra)
    return cls(**values)


def check_options(options, error=ValueError) -> None:
    """Apply every `option` field's bounds and choices to an instance (to each element of a list option);
    `error` names the flag. Numbers must be finite: NaN is refused, not compared."""
    import dataclasses
    import math

    for f in dataclasses.fields(options):
        value, meta = getattr(options, f.name), f.metadata
        if value is None or "help" not in meta or isinstance(value, bool):
            continue
        values = list(value) if isinstance(value, (list, tuple)) and meta.get("parse") else [value]
        if not values:
            raise error(f"{flag_of(f)} needs at least one value")
        for item in values:
            _check_value(flag_of(f), item, meta, error, math)


def _check_value(flag: str, value, meta, error, math) -> None:
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
    if choices and value not in choices:
        raise error(f"{flag} must be one of {', '.join(map(str, choices))}, got {value!r}")
    if lo is None and hi is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or isinstance(value, float) and math.isnan(value):
        raise error(f"{flag} must be a number, got {value!r}")
    if isinstance(lo, int) and isinstance(hi, int) and not isinstance(value, int) and not float(value).is_integer():
        raise error(f"{flag} must be an integer, got {value!r}")
    if lo is not None and value < lo or hi is not None and value > hi:
        raise error(f"{flag} must lie in [{lo}, {hi}], got {value}")
