"""Configs as frozen data: the model's (`ModelConfig`) and an experiment's (`ExperimentConfig`)."""

from phoenix_flax.config.data import DataConfig
from phoenix_flax.config.experiment import (
    CheckpointConfig,
    ConfigError,
    EvalConfig,
    ExperimentConfig,
    LossConfig,
    MeshConfig,
    OptimizerConfig,
    TrainConfig,
    apply_overrides,
    dumps,
    from_dict,
    load,
    replace_fields,
    to_dict,
)
from phoenix_flax.config.model import DEFAULT_ACTION_WEIGHTS, DEFAULT_ACTIONS, ModelConfig

__all__ = [
    "DEFAULT_ACTIONS",
    "DEFAULT_ACTION_WEIGHTS",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ExperimentConfig",
    "LossConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimizerConfig",
    "TrainConfig",
    "apply_overrides",
    "dumps",
    "from_dict",
    "load",
    "replace_fields",
    "to_dict",
]
