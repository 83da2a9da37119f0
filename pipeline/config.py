"""Typed configs: dataclasses loaded from YAML and ``key=value`` overrides.

Every stage declares one dataclass (nested dataclasses allowed). ``load_config`` merges, in order,
the dataclass defaults, an optional YAML file, and dotted ``key=value`` overrides, and rejects
unknown keys (with a suggestion) and values of the wrong type with a message naming the key. A class
whose defaults depend on other keys (training's ``model`` on ``model_preset``) fills them in a
``fill_defaults(data)`` classmethod, called on the merged values before they are checked.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import hashlib
import json
import os
import shutil
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


MAX_FRAMES = 32  # rows of the frame position embedding: the most frames a clip may have (torch-free here)


class ConfigError(ValueError):
    """A config file, flag or override that cannot be used; the message names the key."""


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only lossless cases (int -> float)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} is not a valid {' or '.join(_type_name(a) for a in args)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string, in files and overrides
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    fill = getattr(cls, "fill_defaults", None)  # defaults that depend on other keys (a model preset)
    if fill is not None:
        data = fill(data)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, names, n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown config key '{prefix}{k}'{hint}; known keys: {', '.join(names)}")
    kwargs = {k: _coerce(prefix + k, v, hints[k]) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field without default
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", value), the value parsed as YAML (so ``8``, ``true``, ``[1,2]``, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
) -> T:
    """Build ``cls`` from defaults < YAML file < ``values`` (dotted keys) < ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
        data = loaded or {}
    for k, v in (values or {}).items():
        _set_dotted(data, k, v)
    for text in overrides or []:
        _set_dotted(data, *parse_override(text))
    return _build(cls, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def check_writable(folder: str | Path, what: str = "output") -> None:
    """Create ``folder`` if needed and prove a file can be written in it: one line before any work,
    not a traceback from a worker hours later (permission bits alone say nothing for root, so a
    file is actually created)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{what}: cannot write in {str(folder)!r}: {e.strerror or e}") from None


class DiskFullError(ConfigError):
    """No space left on the device of a path. A ConfigError, so every command's one-line handler shows
    it; what was committed before (shards, complete checkpoints) stays valid and a rerun resumes."""


# Writers that lose the errno: torch.save's zip writer reports ENOSPC as these RuntimeErrors.
_HIDDEN_ENOSPC = ("unexpected pos", "PytorchStreamWriter failed writing")


def _chain(e: BaseException | None):
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__  # ``cause``: a Ray task error


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return None


def out_of_space(e: BaseException, path: str | Path) -> DiskFullError | None:
    """The one-line error for ``e`` when it (or an exception it wraps) is "no space left on device",
    or a writer error that hides it while the device of ``path`` has less than 1 MiB free; else None."""
    for err in _chain(e):
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            where = err.filename or path
            break
        if "No space left on device" in str(err):
            where = path
            break
        if any(s in str(err) for s in _HIDDEN_ENOSPC) and (_free_bytes(Path(path)) or 0) < 1 << 20:
            where = path
            break
    else:
        return None
    free = _free_bytes(Path(where))
    return DiskFullError(
        f"no space left on device at {where}"
        + (f" ({free:,} bytes free now)" if free is not None else "")
        + ": free some space and rerun the same command (finished work is kept)"
    )


def fingerprint(data: Any) -> str:
    """Stable short hash of JSON-able data (config subsets, encoder settings)."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


@dataclasses.dataclass
class WeightPaths:
    """Where the frozen encoder's weights are: a Hugging Face BLIP-2 folder, or the two original LAVIS
    files (``eva_vit_g.pth`` + ``blip2_pretrained_*.pth``). Mixed into the model's, the feature cache's
    and inference's configs, so their keys stay flat (``model.blip2_path``, ``features.blip2_path``) and
    the either/or rule is written once, here. All empty: a random encoder (tests, the demo)."""

    blip2_path: str | None = None
    eva_vit_path: str | None = None
    qformer_lavis_path: str | None = None

    def weight_paths(self) -> dict[str, str | None]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(WeightPaths)}

    def check_weight_paths(self, section: str) -> None:
        if self.blip2_path and (self.eva_vit_path or self.qformer_lavis_path):
            raise ConfigError(f"{section}: give blip2_path or eva_vit_path+qformer_lavis_path, not both")
        if bool(self.eva_vit_path) != bool(self.qformer_lavis_path):
            raise ConfigError(f"{section}: eva_vit_path and qformer_lavis_path go together")

    @property
    def has_encoder_weights(self) -> bool:
        return bool(self.blip2_path or self.eva_vit_path)

    def weight_overrides(self) -> dict[str, str | None]:
        """The paths set here, as overrides of another config's: one encoder source replaces the other."""
        values = {k: v for k, v in self.weight_paths().items() if v is not None}
        if "blip2_path" in values:
            values.setdefault("eva_vit_path", None)
            values.setdefault("qformer_lavis_path", None)
        elif "eva_vit_path" in values:
            values.setdefault("blip2_path", None)
        return values
