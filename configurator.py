"""
The command line, beside neighbor_grpo.py (nanoGPT's configurator.py in spirit): --preset=NAME first, then
--field=value overrides of any dataclass field, typed by its annotation; --help prints the docstring, the presets and
each dataclass of the config's lineage in order (the method's Config first). Imports nothing of ours.
"""

import dataclasses
import difflib
import inspect
import sys
import typing


class ConfigError(ValueError):
    """A configuration that cannot work: the message names the field and the fix."""


def convert(name, text, annotation):
    """text as the field's type: bool (1/0, true/false, yes/no), a comma-separated tuple, or the type itself."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    try:
        if annotation is bool:
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return text.lower() in ("1", "true", "yes")
        if origin is tuple:
            return tuple(args[0](x) for x in text.split(",") if x.strip() != "")
        return annotation(text)
    except ValueError:
        raise ConfigError(f"--{name}={text}: expected {getattr(annotation, '__name__', annotation)}") from None


def configure(argv, config, presets, aliases=None, auto=()):
    """config(**presets[NAME]) with the overrides of argv (a bare --flag sets a bool to true; aliases: older names;
    auto: int fields whose --field=auto sets 0, a value the program decides)."""
    fields, aliases, overrides = {f.name: f for f in dataclasses.fields(config)}, aliases or {}, {}
    for arg in argv:
        if arg in ("-h", "--help"):  # grouped: the method's Config, then the engineering, then a script's own
            sources = [inspect.getsource(c) for c in config.__mro__[::-1] if dataclasses.is_dataclass(c)]
            print(sys.modules[config.__module__].__doc__ + "\nPresets: " + ", ".join(presets) + "\n\n" +
                  "\n".join(sources))
            sys.exit(0)
        if not arg.startswith("--"):
            raise ConfigError(f"argument {arg!r}: expected --field=value (see --help)")
        key, _, value = arg[2:].partition("=")
        key = aliases.get(key.replace("-", "_"), key.replace("-", "_"))
        if key != "preset" and key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            raise ConfigError(f"--{key}: no such field" + (f"; did you mean --{close[0]}?" if close else "; see --help"))
        overrides[key] = value if "=" in arg else "true"
    preset = overrides.pop("preset", next(iter(presets)))
    if preset not in presets:
        raise ConfigError(f"--preset={preset}: unknown preset; use one of {', '.join(presets)}")
    cfg = config(**presets[preset])
    for key, value in overrides.items():
        setattr(cfg, key, 0 if key in auto and value == "auto" else convert(key, value, fields[key].type))
    return cfg
