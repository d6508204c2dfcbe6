"""Typed experiment configs: nested frozen dataclasses, loaded from `configs/*.py`.

A config file defines `get_config() -> ExperimentConfig`. Overrides `--config.a.b=value` are
parsed by the field's type; an unknown key or a value of the wrong type is an error naming it.
Configs round-trip through JSON (saved with every checkpoint).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import types
import typing
from collections.abc import Sequence
from typing import Literal

from phoenix_flax.config.model import ModelConfig
from phoenix_flax.data.config import DataConfig


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; -1 takes the devices the other axes leave."""

    data: int = -1
    fsdp: int = 1
    model: int = 1


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-3  # dense weights: AdamW
    table_learning_rate: float = 0.05  # hash tables: Adagrad
    table_optimizer: Literal["adagrad", "adamw"] = "adagrad"
    warmup_steps: int = 100
    end_learning_rate_fraction: float = 0.1  # cosine decay to this fraction of the peak
    weight_decay: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    grad_clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class LossConfig:
    ranking_weight: float = 1.0
    retrieval_weight: float = 0.0
    logq: Literal["none", "estimated"] = "estimated"  # logQ correction of the sampled softmax
    frequency_buckets: int = 1 << 20
    frequency_alpha: float = 0.01
    action_weights: tuple[float, ...] | None = None  # per-action BCE weights; None: all 1


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 500
    keep: int = 3  # the latest K, and beside them the best by `best_metric`
    best_metric: str = "eval_loss"
    best_mode: Literal["min", "max"] = "min"
    asynchronous: bool = True


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every_steps: int = 500  # validation during training, for the best checkpoint
    batches: int = 20  # batches of validation per evaluation during training


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 10000
    log_every: int = 50
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


class ConfigError(ValueError):
    pass


def _field_types(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _parse(text: str, tp, key: str):
    """A command-line string -> a value of type `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _parse(text, inner, key)
    if origin is Literal:
        if text not in args:
            raise ConfigError(f"--config.{key}={text!r}: expected one of {list(args)}")
        return text
    if origin is tuple:
        item = args[0]
        return tuple(_parse(part.strip(), item, key) for part in text.split(",") if part.strip())
    if tp is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}={text!r}: expected true or false")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise ConfigError(f"--config.{key}={text!r}: expected {tp.__name__}") from None
    if tp is str:
        return text
    raise ConfigError(f"--config.{key}: cannot be set from the command line")


def override(cfg, key: str, text: str, _full: str | None = None):
    """`cfg` with the field at dotted `key` set from the string `text`."""
    full = _full or key
    head, _, rest = key.partition(".")
    fields = _field_types(type(cfg))
    if head not in fields:
        raise ConfigError(f"unknown config key {full!r}: {type(cfg).__name__} has {sorted(fields)}")
    current = getattr(cfg, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"unknown config key {full!r}: {head!r} has no fields")
        value = override(current, rest, text, full)
    elif dataclasses.is_dataclass(current):
        raise ConfigError(f"config key {full!r} is a section; set one of its fields")
    else:
        value = _parse(text, fields[head], full)
    try:
        return dataclasses.replace(cfg, **{head: value})
    except ValueError as e:  # a section's own validation (e.g. ModelConfig)
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"--config.{full}={text!r}: {e}") from None


def apply_overrides(cfg: ExperimentConfig, args: Sequence[str]) -> ExperimentConfig:
    """Applies `--config.a.b=value` (or `--config.a.b value`) arguments; others are an error."""
    args = list(args)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--config."):
            raise ConfigError(f"unrecognised argument {arg!r}")
        key, eq, text = arg[len("--config.") :].partition("=")
        if not eq:
            if not args:
                raise ConfigError(f"{arg} needs a value")
            text = args.pop(0)
        cfg = override(cfg, key, text)
    return cfg


def load(path: str) -> ExperimentConfig:
    """Runs `get_config()` of a config file; it may import the other configs of its folder."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found")
    spec = importlib.util.spec_from_file_location("phoenix_experiment_config", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load a config from {path!r}")
    module = importlib.util.module_from_spec(spec)
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config()")
    cfg = module.get_config()
    if not isinstance(cfg, ExperimentConfig):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, not ExperimentConfig")
    return cfg


def replace_fields(cfg: ExperimentConfig, **sections: dict) -> ExperimentConfig:
    """`cfg` with fields of its sections replaced: `replace_fields(cfg, loss={"retrieval_weight": 0})`."""
    return dataclasses.replace(
        cfg, **{name: dataclasses.replace(getattr(cfg, name), **fields) for name, fields in sections.items()}
    )


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict, cls=ExperimentConfig):
    """The inverse of `to_dict` (JSON lists become tuples)."""
    hints = _field_types(cls)
    kwargs = {}
    for name, value in d.items():
        if name not in hints:
            raise ConfigError(f"unknown config key {name!r} for {cls.__name__}")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            value = from_dict(value, tp)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def dumps(cfg: ExperimentConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2)
