"""Strict parsing of configuration dataclasses from YAML/dicts, their JSON form, and stable hashes.

Every run writes its resolved config beside its results; checkpoints and evaluation cells are
cached under a hash of the parts of a config that determine them (:func:`stable_hash`), with options
added later left out while they hold their default (:func:`key_dict`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from typing import Any

from f2d2.divergence import Exact, Hutchinson, estimator_spec, parse_estimator


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the key."""


def _is_estimator(tp: Any) -> bool:
    return tp in (Exact | Hutchinson, typing.Union[Exact, Hutchinson])


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check and convert one value to the annotated type ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_estimator(tp):
        if isinstance(value, (Exact, Hutchinson)):
            return value
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected an estimator spec string, got {value!r}")
        try:
            return parse_estimator(value)
        except ValueError as err:
            raise ConfigError(f"{path}: {err}") from None
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, path)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return {str(k): _convert(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(value):  # no setting here is meaningful at NaN or infinity
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int or tp is bool or tp is str:
        if type(value) is not tp:
            raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict, path: str = "", base: Any = None) -> Any:
    """Build dataclass ``cls`` from a dict, strictly: unknown keys and wrong types name the key.

    Missing keys take their value from ``base`` (an instance of ``cls``) or the class default.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"unknown key {where!r}; valid keys: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        current = getattr(base, key) if base is not None else None
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            kwargs[key] = from_dict(type(current), value, where, current)
        else:
            kwargs[key] = _convert(hints[key], value, where)
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path or cls.__name__}: {err}") from None


def merge(base: Any, overrides: dict, path: str = "") -> Any:
    """``base`` (a dataclass instance) with ``overrides`` applied strictly and recursively."""
    return from_dict(type(base), overrides, path, base) if overrides else base


def to_dict(obj: Any) -> Any:
    """JSON/YAML-ready form of a config (estimators as their spec strings)."""
    if isinstance(obj, (Exact, Hutchinson)):
        return estimator_spec(obj)
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def key_dict(obj: Any) -> Any:
    """:func:`to_dict` for cache keys: a dataclass field named in the class's ``KEY_OMITS_DEFAULT``
    is left out while it holds its default, so adding an option to a config never changes the key of
    (and never invalidates) the checkpoints and cells made before the option existed."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type) and not isinstance(obj, (Exact, Hutchinson)):
        omit = getattr(type(obj), "KEY_OMITS_DEFAULT", ())
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.name in omit and value == _field_default(f):
                continue
            out[f.name] = key_dict(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [key_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): key_dict(v) for k, v in obj.items()}
    return to_dict(obj)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def stable_hash(obj: Any, length: int = 12) -> str:
    """Hex digest of the canonical JSON of ``to_dict(obj)``: equal configs give equal keys."""
    text = json.dumps(key_dict(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def read_sweep_yaml(path: str) -> dict:
    """The mapping in a YAML sweep file (validated against :class:`SweepConfig` by :func:`apply_sweep_yaml`)."""
    import yaml

    with open(path) as handle:
        try:
            data = yaml.safe_load(handle)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a sweep file must be a mapping of SweepConfig keys")
    return data


def apply_sweep_yaml(path: str, data: dict, base: Any) -> Any:
    """``base`` with the YAML mapping applied; unknown keys and wrong types name the key."""
    try:
        return merge(base, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
