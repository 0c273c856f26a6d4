"""Typed configs: one dataclass per command, loadable from YAML, overridable by flags, validated, written out.

A field's metadata carries its help text and its constraints:
    learning_rate: float = option(1e-4, "peak learning rate", low=0, high=1, low_open=True)
Flags are the field names with dashes (`--learning-rate`). Precedence: defaults < YAML (`--config`) < flags.
A float is always a finite number unless the field says what infinity means (`inf=...`): NaN never passes.
Renamed options keep their old names as aliases (a config's ALIASES, old -> new), with a notice; so do renamed
choices (VALUE_ALIASES, field -> {old: new}).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from domainlm.errors import DomainLMError

C = TypeVar("C")


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    inf: str | None = None,
    positional: bool = False,
) -> Any:
    """A config field with help text and an optional [low, high] range (low exclusive if low_open, high if
    high_open). `inf`: what an infinite value means, where one is allowed (e.g. "no clipping")."""
    meta = {
        "help": help,
        "low": low,
        "high": high,
        "low_open": low_open,
        "high_open": high_open,
        "inf": inf,
        "positional": positional,
    }
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def reuse(group: type, name: str, default: Any, help: str | None = None) -> Any:
    """A field of an option group with another default (and help text) in one command: the same flag, range and
    meaning, e.g. `learning_rate: float = reuse(OptimizerOptions, "learning_rate", 1e-4)`."""
    f = group.__dataclass_fields__[name]
    meta = dict(f.metadata)
    if help is not None:
        meta["help"] = help
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def aliases(cls: type) -> dict[str, str]:
    """Old option name -> current name, over the config class and its option groups."""
    merged: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        merged.update(vars(klass).get("ALIASES", {}))
    return merged


def value_aliases(cls: type) -> dict[str, dict[str, str]]:
    merged: dict[str, dict[str, str]] = {}
    for klass in reversed(cls.__mro__):
        for name, table in vars(klass).get("VALUE_ALIASES", {}).items():
            merged.setdefault(name, {}).update(table)
    return merged


_NOTICED: set[str] = set()


def _notice(text: str) -> None:
    """A renamed option or choice: said once per process, on stderr."""
    if text not in _NOTICED:
        _NOTICED.add(text)
        print(f"notice: {text}", file=sys.stderr)


def canonical(cls: type, values: dict[str, Any], where: str = "") -> dict[str, Any]:
    """`values` with renamed options and choices under their current names (a notice for each); an option given
    under both its names is an error."""
    renamed, choices = aliases(cls), value_aliases(cls)
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in renamed:
            new = renamed[name]
            if new in values or new.replace("_", "-") in values:
                raise DomainLMError(f"{where}{_flag(name)} and {_flag(new)} are the same option (renamed); give one")
            _notice(f"{_flag(name)} is now {_flag(new)}; the old name still works")
            name = new
        table = choices.get(name, {})
        word = {True: "yes", False: "no"}.get(value, value) if isinstance(value, bool) else value
        if isinstance(word, str) and word in table:
            _notice(f"{_flag(name)} {word} is now {_flag(name)} {table[word]}; the old choice still works")
            value = table[word]
        out[name] = value
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML or flag value to the field's type, or raise an error naming `where`."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise DomainLMError(f"{where}: a value is required")
    origin = get_origin(tp)
    if isinstance(value, bool) and tp is not bool and (origin is Literal or tp is str):
        return _from_yaml_boolean(value, tp, where)
    try:
        if origin is Literal:
            choices = get_args(tp)
            if value not in choices:
                raise DomainLMError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
            return value
        if origin is list:
            (item,) = get_args(tp)
            if isinstance(value, str) and not dataclasses.is_dataclass(item):
                value = [v for v in value.split(",") if v != ""]
            if not isinstance(value, list | tuple):
                raise DomainLMError(f"{where}: expected a list, got {value!r}")
            if dataclasses.is_dataclass(item):
                return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
            return [_coerce(v, item, where) for v in value]
        if dataclasses.is_dataclass(tp):  # a nested section: a typed config of its own
            if isinstance(value, tp):
                return value
            if not isinstance(value, dict):
                raise DomainLMError(f"{where}: expected a mapping, got {value!r}")
            return load(tp, None, value, where=f"{where}: ")
        if tp is dict:  # nested sections (YAML only), checked by the config's own check()
            if not isinstance(value, dict):
                raise DomainLMError(f"{where}: expected a mapping, got {value!r}")
            return value
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            raise DomainLMError(f"{where}: expected true or false, got {value!r}")
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise DomainLMError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}") from None
    return value


# YAML 1.1 (PyYAML) reads these words unquoted as booleans
YAML_BOOLEAN_WORDS = {True: ("yes", "on", "true"), False: ("no", "off", "false")}


def _from_yaml_boolean(value: bool, tp: Any, where: str) -> str:
    """A boolean where text is expected is a word YAML took for a boolean (`precision: no`). Where exactly one
    of the field's choices is such a word, it is meant; anything else is an error that says how to quote."""
    words = YAML_BOOLEAN_WORDS[value]
    if get_origin(tp) is Literal:
        choices = [c for c in get_args(tp) if isinstance(c, str)]
        meant = [c for c in choices if c.lower() in words]
        if len(meant) == 1:
            return meant[0]
        raise DomainLMError(
            f"{where}: YAML reads an unquoted {'/'.join(words)} as the boolean {str(value).lower()}, which is not one "
            f'of {", ".join(choices)}; write the choice in quotes, e.g. "{choices[0]}"'
        )
    raise DomainLMError(
        f"{where}: YAML reads an unquoted {'/'.join(words)} as the boolean {str(value).lower()}, not as text; "
        f'write the text in quotes, e.g. "{words[0]}"'
    )


def range_error(f: dataclasses.Field, value: Any) -> str | None:
    """Why a field's value is not a finite number (where one is needed) or is outside its [low, high] range
    (naming the flag), or None."""
    meta = f.metadata
    if isinstance(value, float) and math.isnan(value):
        return f"{_flag(f.name)} = nan is not a number"
    if isinstance(value, float) and math.isinf(value):
        if not (meta.get("inf") and value > 0):
            return f"{_flag(f.name)} = {value} is not a finite number"
        return None  # meaning meta["inf"]
    low, high = meta.get("low"), meta.get("high")
    if value is None or (low is None and high is None) or not isinstance(value, int | float):
        return None
    too_low = low is not None and (value <= low if meta.get("low_open") else value < low)
    too_high = high is not None and (value >= high if meta.get("high_open") else value > high)
    if not (too_low or too_high):
        return None
    lo = "-inf" if low is None else low
    hi = "inf" if high is None else high
    bracket = ("(" if meta.get("low_open") else "[", ")" if meta.get("high_open") else "]")
    return f"{_flag(f.name)} = {value} is out of range {bracket[0]}{lo}, {hi}{bracket[1]}"


def validate(cfg: Any, preset: dict[str, Any] | None = None) -> None:
    """Check every field's range; the message names the field (as a flag) and the allowed range, and the preset
    when the value is one the preset set."""
    for f in dataclasses.fields(cfg):
        problem = range_error(f, getattr(cfg, f.name))
        if problem:
            raise DomainLMError(problem + _set_by(f.name, preset))
    check = getattr(cfg, "check", None)
    if check is not None:
        try:
            check()
        except DomainLMError as e:
            named = [n.replace("-", "_") for n in re.findall(r"--([a-z][a-z0-9-]*)", str(e))]
            hit = next((n for n in named if preset and n in preset), None)
            if hit is None:
                raise
            raise DomainLMError(str(e) + _set_by(hit, preset)) from None


def _set_by(name: str, preset: dict[str, Any] | None) -> str:
    if not preset or name not in preset.get("fields", ()):
        return ""
    return f" (set by --preset {preset['name']}; give {_flag(name)} to override it)"


def add_arguments(parser: argparse.ArgumentParser, cls: type, config_flag: bool = True) -> None:
    """One flag per field (nested mappings are YAML only); defaults are suppressed so that only flags the user
    typed override YAML."""
    if config_flag:
        parser.add_argument("--config", help="YAML file with any of the options below (flags override it)")
    hints = typing.get_type_hints(cls)
    choice_aliases = value_aliases(cls)
    for old, new in aliases(cls).items():  # renamed options: the old flag still works (with a notice), unlisted
        parser.add_argument(
            _flag(old),
            dest=old,
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
            **_flag_kind(hints[new], choice_aliases.get(new)),
        )
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(hints[f.name])
        if tp is dict or (get_origin(tp) is list and get_args(tp) == (dict,)) or _nested(tp):
            continue
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            shown = f"default: {f.default_factory()}"  # type: ignore[misc]
        elif f.default is dataclasses.MISSING:
            shown = "required"
        else:
            shown = f"default: {f.default}"
        help_text = f"{f.metadata.get('help', '')} ({shown})"
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="*", default=argparse.SUPPRESS, help=f.metadata.get("help"))
        else:
            parser.add_argument(
                _flag(f.name),
                default=argparse.SUPPRESS,
                help=help_text,
                **_flag_kind(hints[f.name], choice_aliases.get(f.name)),
            )


class _OneOrMore(argparse.Action):
    """A flag given once holds its value; given again, the list of all its values (`--corpus A:0.3 --corpus B:0.7`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        setattr(
            namespace,
            self.dest,
            values if current is None else (current if isinstance(current, list) else [current]) + [values],
        )


def _flag_kind(hint: Any, renamed_choices: dict[str, str] | None) -> dict[str, Any]:
    """argparse's action / choices for a field of type `hint` (renamed choices accepted, not listed)."""
    tp, _ = _unwrap_optional(hint)
    if get_origin(tp) in (typing.Union, types.UnionType) and set(get_args(tp)) == {str, list[str]}:
        return {"action": _OneOrMore, "metavar": "VALUE"}  # one value, or the flag repeated
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if get_origin(tp) is Literal:
        choices = [str(c) for c in get_args(tp)]
        return {"choices": choices + list(renamed_choices or ()), "metavar": "{" + ",".join(choices) + "}"}
    return {"metavar": "VALUE"}


def _nested(tp: Any) -> bool:
    """A nested section (YAML only): a dataclass, or a list of them."""
    inner = get_args(tp)[0] if get_origin(tp) is list and get_args(tp) else tp
    return dataclasses.is_dataclass(inner)


def load(cls: type[C], yaml_path: str | None = None, overrides: dict[str, Any] | None = None, where: str = "") -> C:
    """Build a validated config: defaults, then the YAML file, then explicit overrides. `where` prefixes the
    names in messages about a nested section (e.g. "models[0].pretrain: ")."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if yaml_path:
        from domainlm.files import read_text_input

        path = Path(yaml_path)
        try:
            raw = yaml.safe_load(read_text_input(path, "--config")) or {}
        except yaml.YAMLError as e:
            raise DomainLMError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise DomainLMError(f"{path}: expected a mapping of option: value")
        for name, value in canonical(cls, raw, f"{path}: ").items():
            if name not in names:
                raise DomainLMError(f"{path}: unknown option {name!r} (known: {', '.join(sorted(names))})")
            values[name] = _coerce(value, hints[name], f"{path}: {name}")
    for name, value in canonical(cls, overrides or {}, where).items():
        if name not in names and where:  # a nested YAML section: its keys
            raise DomainLMError(f"{where}unknown key {name!r} (known: {', '.join(sorted(names))})")
        if name not in names:
            raise DomainLMError(f"unknown option {_flag(name)}")
        values[name] = _coerce(value, hints[name], f"{where}{_flag(name)}")
    preset = None
    if values.get("preset"):  # a named preset fills the options that YAML and flags left unset
        settings = getattr(cls, "PRESETS", {})[values["preset"]]
        preset = {"name": values["preset"], "fields": [n for n in settings if n not in values]}
        for name in preset["fields"]:
            values[name] = settings[name]
    required = [f for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
    missing = [f.name for f in required if f.name not in values and f.default_factory is dataclasses.MISSING]
    if missing:
        raise DomainLMError(f"{where}missing required option(s): " + ", ".join(_flag(m) for m in missing))
    cfg = cls(**values)
    try:
        validate(cfg, preset)
    except DomainLMError as e:
        raise DomainLMError(f"{where}{e}") from None
    if preset:
        cfg.preset_fields = preset["fields"]  # not a field: what the preset set, for later notices
    return cfg


def from_args(cls: type[C], args: argparse.Namespace) -> C:
    given = {k: v for k, v in vars(args).items() if k not in ("config", "command", "func")}
    return load(cls, getattr(args, "config", None), given)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump(cfg: Any) -> str:
    """The resolved config as YAML, so that every output folder says exactly how it was made."""
    from domainlm.files import yaml_text

    return yaml_text(to_dict(cfg))


def write(cfg: Any, folder: str | Path, name: str = "config.yaml") -> Path:
    """The resolved config written atomically as `folder`/`name` (job files; a run writes it through its RunFolder)."""
    from domainlm.files import atomic_write

    return atomic_write(Path(folder) / name, dump(cfg))


def check_values(cls: type[C], values: dict[str, Any]) -> tuple[C | None, dict[str, str]]:
    """Every problem with a set of option values at once, by field name (for forms and APIs that show each
    message next to its field); the validated config when there is none. Same rules as `load`."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    errors: dict[str, str] = {}
    coerced: dict[str, Any] = {}
    try:
        values = canonical(cls, values)
    except DomainLMError as e:
        return None, {"_config": str(e)}
    for name, value in values.items():
        if name not in fields:
            errors[name] = f"unknown option {_flag(name)}"
            continue
        try:
            coerced[name] = _coerce(value, hints[name], _flag(name))
        except DomainLMError as e:
            errors[name] = str(e)
            continue
        problem = range_error(fields[name], coerced[name])
        if problem:
            errors[name] = problem
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        if required and name not in values:
            errors[name] = f"{_flag(name)}: a value is required"
    if errors:
        return None, errors
    try:
        return load(cls, None, coerced), {}
    except DomainLMError as e:  # a cross-field check(): attach it to the first flag it names
        named = [m.replace("-", "_") for m in re.findall(r"--([a-z][a-z0-9-]*)", str(e))]
        return None, {next((n for n in named if n in fields), "_config"): str(e)}
