"""Configuration dataclasses: one per concern, loaded from YAML, overridable from the CLI.

A *section* is a flat dataclass whose fields are ints, floats, strings, bools, or lists of
them; every field carries its help text (see :func:`field`). A run configuration groups
sections (``TrainConfig.sampling``, ``TrainConfig.optim``, ...). On the command line every
field of every section is one flag (``--batch-size``); in YAML, sections are nested mappings
(``sampling: {batch_size: 512}``). Field names are unique across the sections of one config.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from bgrl_dgl.errors import InputError
from bgrl_dgl.io import write_atomic

T = TypeVar("T")


def field(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with help text; list defaults are copied per instance.

    ``parse=function`` (metadata) turns a flag's or YAML's text into the field's value (e.g.
    :func:`parse_size` for byte counts written ``2GB``), so a setting is parsed once, into
    its final type.
    """
    meta = {"help": help, **metadata}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _scalar_parser(tp: Any, name: str):
    if get_origin(tp) is Literal:
        choices = get_args(tp)

        def parse_choice(text: str):
            for choice in choices:
                if str(choice) == text:
                    return choice
            allowed = ", ".join(map(str, choices))
            raise argparse.ArgumentTypeError(f"{name} must be one of {allowed}")

        return parse_choice
    if tp is bool:
        return parse_bool
    if tp in (int, float, str):
        return tp
    raise TypeError(f"unsupported config field type {tp!r} for {name}")


def parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def _value_parser(tp: Any, name: str):
    """A function turning one command-line string into a value of type ``tp``."""
    inner, optional = _split_optional(tp)
    if get_origin(inner) is list:
        item = _scalar_parser(get_args(inner)[0], name)

        def parse_list(text: str):
            if optional and text.lower() in ("none", ""):
                return None
            return [item(part.strip()) for part in text.split(",") if part.strip()]

        return parse_list
    scalar = _scalar_parser(inner, name)
    if optional:
        return lambda text: None if text.lower() == "none" else scalar(text)
    return scalar


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> None:
    """Add one flag per field of the section ``cls``; unset flags parse as ``None``."""
    types_ = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp = types_[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        parser.add_argument(
            flag_name(f.name),
            dest=f.name,
            type=f.metadata.get("parse") or _value_parser(tp, f.name),
            default=None,
            metavar=f.name.upper(),
            help=f"{f.metadata.get('help', '')} (default: {shown})",
        )


def _coerce(value: Any, tp: Any, where: str, parse: Any = None) -> Any:
    """Check and convert a YAML value to the field type ``tp`` (text through ``parse``, the
    field's own parser, when it has one)."""
    if parse is not None and isinstance(value, str):
        try:
            return parse(value)
        except argparse.ArgumentTypeError as err:
            raise ValueError(f"{where}: {err}") from None
    inner, optional = _split_optional(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where} may not be empty")
    if get_origin(inner) is list:
        if isinstance(value, str):
            return _value_parser(inner, where)(value)
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list")
        return [_coerce(v, get_args(inner)[0], where) for v in value]
    if get_origin(inner) is Literal:
        if value not in get_args(inner):
            raise ValueError(f"{where} must be one of {', '.join(map(str, get_args(inner)))}")
        return value
    if inner is bool:
        return value if isinstance(value, bool) else parse_bool(value)
    if inner is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if inner is float and isinstance(value, str):
        # YAML 1.1 reads 1e-3 (no dot) as text: accept any number written as text.
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where} must be a number, got {value!r}") from None
    if inner is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if inner is str and isinstance(value, (str, int, float)):
        return str(value)
    raise ValueError(f"{where} must be of type {getattr(inner, '__name__', inner)}")


def check_finite(section: Any) -> None:
    """ValueError naming the first float setting of ``section`` (or float in a list setting)
    that is NaN or infinite: such a value would only fail later, or train to NaN."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"{f.name} must be a finite number, got {item}")


def section_from_dict(cls: type[T], data: dict[str, Any], source: str, prefix: str = "") -> T:
    """Build section ``cls`` from a mapping; unknown keys and bad types are InputErrors."""
    types_ = _field_types(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known, key=str)
    if unknown:
        raise InputError(source, f"unknown setting {prefix}{unknown[0]}")
    parsers = {f.name: f.metadata.get("parse") for f in dataclasses.fields(cls)}
    try:
        values = {k: _coerce(v, types_[k], prefix + k, parsers[k]) for k, v in data.items()}
        return cls(**values)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
        raise InputError(source, str(err)) from None


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a (nested) config dataclass, ready for YAML or JSON."""
    return dataclasses.asdict(config)


def sections(config_cls: type) -> dict[str, type]:
    """Section name -> section dataclass of a grouped config class."""
    types_ = _field_types(config_cls)
    return {f.name: types_[f.name] for f in dataclasses.fields(config_cls)}


def add_section_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One argument group per section, with one flag per field."""
    for name, section_cls in sections(config_cls).items():
        add_arguments(parser.add_argument_group(f"{name} settings"), section_cls)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in the YAML file ``path`` (empty for an empty file); InputError when the
    file is missing, not a regular file, unreadable, not UTF-8, not YAML or not a mapping."""
    from bgrl_dgl.store.format import regular_file

    regular_file(path, "YAML file")  # a FIFO would block the read
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except UnicodeDecodeError as err:
        raise InputError(path, f"not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise InputError(path, f"cannot read it ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise InputError(path, f"not valid YAML ({str(err).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(path, "expected a mapping of settings at the top level")
    return data


def from_sections(
    config_cls: type[T],
    data: dict[str, Any] | None = None,
    overrides: argparse.Namespace | dict[str, Any] | None = None,
    source: str = "config",
) -> T:
    """Build a grouped config: defaults <- nested mapping ``data`` <- flat ``overrides``.

    ``overrides`` maps field names to values (``None`` = not given), as parsed by the flags
    from :func:`add_section_arguments`.
    """
    if data is not None and not isinstance(data, dict):
        raise InputError(source, f"expected a mapping of sections, got {_kind(data)}")
    data = dict(data or {})
    flat = vars(overrides) if isinstance(overrides, argparse.Namespace) else dict(overrides or {})
    unknown = sorted(set(data) - set(sections(config_cls)), key=str)
    if unknown:
        raise InputError(source, f"unknown section {unknown[0]}")
    built = {}
    for name, section_cls in sections(config_cls).items():
        values = _section_values(data.get(name), name, source)
        section = section_from_dict(section_cls, values, source, prefix=f"{name}.")
        given = {
            f.name: flat[f.name]
            for f in dataclasses.fields(section_cls)
            if flat.get(f.name) is not None
        }
        if given:
            try:
                section = dataclasses.replace(section, **given)
            except (ValueError, TypeError) as err:
                raise InputError("command line", str(err)) from None
        built[name] = section
    try:  # checks across sections
        return config_cls(**built)
    except (ValueError, TypeError) as err:
        raise InputError(source, str(err)) from None


def _kind(value: Any) -> str:
    """'a list', 'a str', ...: what a value is, for messages."""
    return f"a {type(value).__name__}"


def _section_values(values: Any, name: str, source: str) -> dict[str, Any]:
    """The settings of section ``name`` as given (None: none given); InputError unless a mapping."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise InputError(source, f"section {name} must be a mapping of settings, "
                                 f"got {_kind(values)}")
    return values


def merge_sections(base: dict[str, Any], update: Any, source: str) -> dict[str, Any]:
    """``base`` with each section of the mapping ``update`` merged over it, setting by setting
    (e.g. a --config file over a resumed run's settings); InputError unless ``update`` is a
    mapping of mappings."""
    if not isinstance(update, dict):
        raise InputError(source, f"expected a mapping of sections, got {_kind(update)}")
    merged = dict(base)
    for name, values in update.items():
        merged[name] = {**(merged.get(name) or {}), **_section_values(values, str(name), source)}
    return merged


def save_yaml(data: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``data`` as YAML atomically (temp file + rename)."""
    write_atomic(Path(path), yaml.safe_dump(data, sort_keys=False))


_SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20,
               "g": 2**30, "gb": 2**30, "t": 2**40, "tb": 2**40}


def parse_size(text: str) -> int:
    """'4GB', '512M', '1.5g' or '1000' -> bytes (binary units)."""
    cleaned = str(text).strip().lower().replace("ib", "b")
    number = cleaned.rstrip("kmgtb")
    unit = cleaned[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if unit not in _SIZE_UNITS or not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(value * _SIZE_UNITS[unit])
