"""Typed experiment configs: nested frozen dataclasses, loaded from `configs/*.py`.

A config file defines `get_config() -> ExperimentConfig`. Overrides `--config.a.b=value` are
parsed by the field's type; an unknown key or a value of the wrong type is an error naming it.
Every section checks its values when built, and the experiment checks what sections must agree
on; overrides report all their problems at once (`ConfigError`). Configs round-trip through
JSON (saved with every checkpoint).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import traceback
import types
import typing
from collections.abc import Sequence
from typing import Literal

from phoenix_flax.config.data import DataConfig
from phoenix_flax.config.model import DEFAULT_ACTION_WEIGHTS, ModelConfig
from phoenix_flax.sharding import (
    DEFAULT_RULE_TEXT,
    DEFAULT_RULES,
    MESH_AXES,
    LogicalRules,
    parse_rules,
)
from phoenix_flax.validation import Checks, ConfigError


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes (-1 takes the devices the other axes leave), and the rules placing
    logical axis names on mesh axes (`name:axis+axis`; `name:` replicates)."""

    data: int = -1
    fsdp: int = 1
    model: int = 1
    rules: tuple[str, ...] = DEFAULT_RULE_TEXT

    def __post_init__(self):
        object.__setattr__(self, "rules", tuple(self.rules))
        checks = Checks(self)
        for axis in MESH_AXES:
            checks.require(getattr(self, axis) >= 1 or getattr(self, axis) == -1, axis, "must be positive, or -1")
        if [getattr(self, a) for a in MESH_AXES].count(-1) > 1:
            checks.problem("data", "at most one axis may be -1 (the devices the others leave)")
        try:
            named = {name for name, _ in parse_rules(self.rules)}
            missing = [name for name, _ in DEFAULT_RULES if name not in named]
            checks.require(not missing, "rules", f"name no mesh axes for {missing}")
        except ValueError as e:
            checks.problem("rules", str(e))
        checks.raise_if_any()

    def logical_rules(self) -> LogicalRules:
        return parse_rules(self.rules)

    def axis_sizes(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in MESH_AXES}


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-3  # dense weights: AdamW
    table_learning_rate: float = 0.05  # hash tables: Adagrad
    # "rowwise_adagrad": one accumulator per row, only the rows a step touches updated, nothing of
    # a table's size built per step (phoenix_flax/step/rowwise.py; docs/tables.md); "adagrad":
    # element-wise, on the dense gradient of every table (the step's time grows with the rows);
    # "adamw". The action bias's tables (an extension) keep element-wise Adagrad with either.
    table_optimizer: Literal["rowwise_adagrad", "adagrad", "adamw"] = "rowwise_adagrad"
    # Adagrad's starting sum of squares. A table row's gradient is tiny (its share of a loss that
    # is a mean over every candidate and action of the batch: ~1e-5), so the usual 0.1 holds rows
    # almost still; from 0 a row's step depends on its gradients' history, not their scale.
    table_initial_accumulator: float = 0.0
    # Decoupled weight decay of the table rows a step looks up (the others stay as they are; with
    # AdamW, of every row): a row seen a few times does not memorize its few labels.
    table_weight_decay: float = 0.2
    # The same for the action-bias tables (model.action_bias, an extension). Not decayed by
    # default: Adagrad's steps shrink as 1/sqrt(lookups) while the decay does not, so a decayed row
    # settles smaller the more often it is looked up.
    action_bias_weight_decay: float = 0.0
    # Adagrad's starting sum of squares for the action-bias tables, in impressions: units of the
    # squared gradient one impression's full error on one action gives a row (1 / (batch_size x
    # num_candidates x num_actions), squared). From 0 a row's first step is lr x sign(g): a post's
    # one view and one non-view (gradients 0.9 and 0.05 of the unit) move its offsets as far, and
    # a post seen a few times learns nothing of what it was seen doing. From k, steps follow the
    # gradients' size until about k impressions' worth have accumulated (docs/extensions.md).
    action_bias_initial_accumulator: float = 1.0
    # How the action bias's offsets (the first num_actions columns of its post and author tables)
    # learn. "adagrad": as its other columns. "newton": counting, learned: Newton steps toward each
    # row's most probable offsets, the information an impression adds being its squared gradient
    # (the sum starts from action_bias_initial_accumulator), under a Gaussian prior per table and
    # action that weighs the same after any number of epochs and whose variance is fit to the rows
    # (EM): an action the post decides (video_view) gets a wide prior and is memorized, one the
    # user decides (favorite) a narrow one and is not (`extensions.optimizer.action_bias_newton`).
    action_bias_offsets: Literal["adagrad", "newton"] = "newton"
    action_bias_newton_step: float = 1.0  # the fraction of the Newton step taken
    # Evaluation, the best checkpoint and serving use an exponential moving average of the
    # parameters, this decay per step (0: the parameters as trained). Off by default: on the
    # demo's worlds it changed neither ranking nor calibration beyond run-to-run noise (docs/).
    ema_decay: float = 0.0
    warmup_steps: int = 100
    end_learning_rate_fraction: float = 0.1  # cosine decay to this fraction of the peak
    weight_decay: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    grad_clip_norm: float = 1.0
    # Bad steps: with skip_bad_steps, a step whose gradient norm is not finite, or above
    # bad_step_norm_factor times the median of the last bad_step_window kept steps', is skipped
    # (parameters and optimizer state unchanged) and counted in the log; training stops after
    # max_bad_steps_in_a_row in a row. Off: a non-finite loss stops training at once.
    skip_bad_steps: bool = False
    bad_step_norm_factor: float = 10.0
    bad_step_window: int = 100
    max_bad_steps_in_a_row: int = 10

    def __post_init__(self):
        checks = Checks(self).positive("learning_rate", "table_learning_rate", "grad_clip_norm")
        checks.require(self.bad_step_norm_factor > 1, "bad_step_norm_factor", "must be above 1")
        checks.at_least(4, "bad_step_window").at_least(1, "max_bad_steps_in_a_row")
        checks.at_least(0, "warmup_steps", "table_initial_accumulator", "table_weight_decay")
        checks.at_least(0, "action_bias_initial_accumulator", "action_bias_weight_decay")
        step = self.action_bias_newton_step
        checks.require(0 < step <= 1, "action_bias_newton_step", "must be in (0, 1]")
        if self.action_bias_offsets == "newton":  # the prior is the only regularizer; no step divides by 0
            checks.require(
                self.action_bias_weight_decay == 0, "action_bias_weight_decay", "must be 0 with newton offsets"
            )
            checks.require(
                self.action_bias_initial_accumulator > 0,
                "action_bias_initial_accumulator",
                "must be > 0 with newton offsets",
            )
        checks.between(0, 1, "end_learning_rate_fraction")
        checks.between(0, 1, "ema_decay", high_open=True)
        checks.require(
            self.ema_decay == 0 or self.table_optimizer != "rowwise_adagrad",
            "ema_decay",
            "must be 0 with table_optimizer='rowwise_adagrad' (averaging every table row each step is the "
            "table-sized work it avoids)",
        )
        checks.between(0, 1, "b1", "b2", high_open=True).require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        checks.literals().raise_if_any()


@dataclasses.dataclass(frozen=True)
class LossConfig:
    ranking_weight: float = 1.0
    retrieval_weight: float = 0.0
    logq: Literal["none", "estimated"] = "estimated"  # logQ correction of the sampled softmax
    frequency_buckets: int = 1 << 20
    frequency_alpha: float = 0.01
    action_weights: tuple[float, ...] | None = None  # per-action BCE weights; None: all 1
    # Weight of the exposure softmax beside the ranking loss (an extension: `extensions/exposure.py`):
    # the action bias's user affinity factors against the factors of the authors the user was
    # shown, every shown candidate a positive (engaged or not), against one shown author of every
    # other session (logQ, with logq="estimated", from their streamed frequency). What a user is
    # shown tells their interests (the feed chose it by them) for every candidate, where labels
    # tell it for the few engaged. Needs the ranker's affinity (model.action_bias,
    # model.affinity_rank > 0).
    exposure_weight: float = 0.0

    def __post_init__(self):
        checks = Checks(self).at_least(0, "ranking_weight", "retrieval_weight", "exposure_weight")
        checks.require(
            self.ranking_weight > 0 or self.retrieval_weight > 0,
            "ranking_weight",
            "ranking_weight or retrieval_weight must be positive: nothing would be trained",
        )
        checks.at_least(1, "frequency_buckets").between(0, 1, "frequency_alpha")
        checks.require(self.frequency_alpha > 0, "frequency_alpha", "must be in (0, 1]")
        if self.action_weights is not None:
            ok = all(math.isfinite(w) and w >= 0 for w in self.action_weights) and sum(self.action_weights) > 0
            checks.require(ok, "action_weights", "must be finite, non-negative and not all zero")
        checks.literals().raise_if_any()


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 500
    keep: int = 3  # the latest K, and beside them the best by `best_metric`
    best_metric: str = "eval_loss"
    best_mode: Literal["min", "max"] = "min"
    asynchronous: bool = True

    def __post_init__(self):
        Checks(self).at_least(1, "every_steps", "keep").literals().raise_if_any()


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every_steps: int = 500  # validation during training, for the best checkpoint
    batches: int = 20  # batches of validation per evaluation during training; 0: none
    # The prior of model.calibration's shifts (std in logits; 0.1 is about 10% of a probability):
    # an action with few validation positives keeps its shift near 0.
    calibration_prior_std: float = 0.1
    # With model.count_blend, the prior of its weights (about 1 for the logits' parts, 0 for the
    # counts; std in logits). Its shifts match the training and validation rates instead.
    blend_prior_std: float = 1.0

    def __post_init__(self):
        checks = Checks(self).at_least(1, "every_steps").at_least(0, "batches")
        checks.positive("calibration_prior_std", "blend_prior_std").raise_if_any()


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 10000
    # Training length in passes over the training split instead: when set, `steps` becomes
    # ceil(epochs x sessions / data.batch_size), resolved when training starts.
    epochs: float | None = None
    log_every: int = 50
    seed: int = 0

    def __post_init__(self):
        checks = Checks(self).at_least(1, "steps", "log_every")
        if self.epochs is not None:
            checks.require(math.isfinite(self.epochs) and self.epochs > 0, "epochs", "must be a positive number")
        checks.raise_if_any()


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

    def __post_init__(self):
        problems = agreement_problems(vars(self))
        if problems:
            raise ConfigError(problems)


def agreement_problems(sections: dict, invalid: frozenset[str] = frozenset()) -> list[str]:
    """What the sections must agree on. A check runs only when every field it reads is given and
    valid: `invalid` names the fields ('model.emb_size') their own section rejected, so nothing
    is derived from a value that is itself wrong."""

    def usable(*keys: str) -> bool:
        return all(sections.get(k.partition(".")[0]) is not None and k not in invalid for k in keys)

    problems = []
    model, loss, checkpoint, evaluation, data = (
        sections.get(k) for k in ("model", "loss", "checkpoint", "eval", "data")
    )  # fmt: skip
    exposure = ("loss.exposure_weight", "loss.ranking_weight", "model.action_bias", "model.affinity_rank")
    affinity = usable(*exposure) and loss.ranking_weight > 0 and model.action_bias and model.affinity_rank > 0
    if usable(*exposure) and loss.exposure_weight > 0 and not affinity:
        problems.append(
            f"loss.exposure_weight={loss.exposure_weight} trains the ranker's affinity factors: it needs "
            f"loss.ranking_weight > 0, model.action_bias and model.affinity_rank > 0 (have "
            f"{loss.ranking_weight}, {model.action_bias}, {model.affinity_rank})"
        )
    packing = ("data.pack_prefix", "data.pack_candidates", "model.history_len", "model.num_candidates")
    if usable(*packing) and data.packed:
        if data.pack_prefix < 1 + model.history_len or data.pack_candidates < model.num_candidates:
            problems.append(
                f"data.pack_prefix={data.pack_prefix} and data.pack_candidates={data.pack_candidates} must hold "
                f"one whole session: at least 1 + model.history_len = {1 + model.history_len} and "
                f"model.num_candidates = {model.num_candidates}"
            )
        if usable("train.epochs") and sections["train"].epochs is not None:
            problems.append(
                "train.epochs counts sessions / data.batch_size steps an epoch; packed rows (data.pack_prefix) "
                "hold several sessions each: give train.steps"
            )
        if usable("loss.exposure_weight") and loss.exposure_weight > 0:
            problems.append(
                "data.pack_prefix: the exposure softmax (loss.exposure_weight, an extension) reads a session a "
                "row; train it unpacked (data.pack_prefix=0)"
            )
    weights = usable("loss.action_weights", "model.actions") and loss.action_weights is not None
    if weights and len(loss.action_weights) != len(model.actions):
        problems.append(f"loss.action_weights has {len(loss.action_weights)} weights for {len(model.actions)} actions")
    best = ("checkpoint.best_metric", "checkpoint.best_mode", "loss.ranking_weight", "loss.retrieval_weight")
    if usable(*best, "eval.batches", "model.actions") and checkpoint.best_metric:
        produced = eval_metric_names(loss, evaluation, model)
        unweighted = sorted(set(model.actions) - set(DEFAULT_ACTION_WEIGHTS))
        if checkpoint.best_metric == "eval_weighted_auc" and loss.ranking_weight > 0 and unweighted:
            problems.append(
                f"checkpoint.best_metric='eval_weighted_auc' needs a default score weight for every action; "
                f"model.actions has {unweighted} without one (pick another metric, e.g. 'eval_mean_auc')"
            )
        elif checkpoint.best_metric not in produced:
            problems.append(
                f"checkpoint.best_metric={checkpoint.best_metric!r}: evaluation during training produces "
                f"{sorted(produced) or 'nothing (eval.batches=0)'}; '' keeps no best checkpoint"
            )
        elif checkpoint.best_metric.endswith("_auc") and checkpoint.best_mode != "max":
            problems.append(f"checkpoint.best_metric={checkpoint.best_metric!r} is better higher: set best_mode='max'")
    return problems


def eval_metric_names(loss: LossConfig, evaluation: EvalConfig, model: ModelConfig | None = None) -> set[str]:
    """The metrics evaluation during training reports (what `checkpoint.best_metric` may name):
    losses; with a ranker, the mean of the actions' AUC and, where every action has a default
    score weight (`DEFAULT_ACTION_WEIGHTS`), the weighted score's AUC."""
    if evaluation.batches == 0:
        return set()
    names = {"loss"}
    if loss.ranking_weight > 0:
        names |= {"ranking_loss", "mean_auc"}
        if model is not None and set(model.actions) <= set(DEFAULT_ACTION_WEIGHTS):
            names.add("weighted_auc")
    if loss.retrieval_weight > 0:
        names |= {"retrieval_loss", "temperature"}
    return {f"eval_{n}" for n in names}


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
            value = tp(text)
        except ValueError:
            raise ConfigError(f"--config.{key}={text!r}: expected {tp.__name__}") from None
        if not math.isfinite(value):
            raise ConfigError(f"--config.{key}={text!r}: expected a finite number")
        return value
    if tp is str:
        return text
    raise ConfigError(f"--config.{key}: cannot be set from the command line")


def _set(values: dict, cls, key: str, text: str, full: str) -> None:
    """Sets the field at dotted `key` of the nested dict `values` (of dataclass `cls`) from `text`."""
    head, _, rest = key.partition(".")
    fields = _field_types(cls)
    if head not in fields:
        raise ConfigError(f"unknown config key {full!r}: {cls.__name__} has {sorted(fields)}")
    tp = fields[head]
    if rest:
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"unknown config key {full!r}: {head!r} has no fields")
        _set(values[head], tp, rest, text, full)
    elif dataclasses.is_dataclass(tp):
        raise ConfigError(f"config key {full!r} is a section; set one of its fields")
    else:
        values[head] = _parse(text, tp, full)


def apply_overrides(cfg: ExperimentConfig, args: Sequence[str]) -> ExperimentConfig:
    """Applies `--config.a.b=value` (or `--config.a.b value`) arguments; others are an error.

    Every problem (unknown keys, unparsable values, values a section rejects) is collected and
    raised together in one `ConfigError`.
    """
    values, problems = to_dict(cfg), []
    args = list(args)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--config."):
            problems.append(f"unrecognised argument {arg!r}")
            continue
        key, eq, text = arg[len("--config.") :].partition("=")
        if not eq:
            if not args:
                problems.append(f"{arg} needs a value")
                continue
            text = args.pop(0)
        try:
            _set(values, type(cfg), key, text, key)
        except ConfigError as e:
            problems.extend(e.problems)
    try:
        built = from_dict(values)
    except ConfigError as e:
        problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    return built


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
        if not hasattr(module, "get_config"):
            raise ConfigError(f"{path} defines no get_config()")
        cfg = module.get_config()
    except SyntaxError as e:
        raise ConfigError(f"{e.filename}:{e.lineno}: {e.msg}") from e
    except ConfigError:
        raise
    except Exception as e:  # the config's own code failed: where, in the config files
        raise ConfigError(f"{_config_frame(e, folder)}: {type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(folder)
    if not isinstance(cfg, ExperimentConfig):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, not ExperimentConfig")
    return cfg


def _config_frame(error: Exception, folder: str) -> str:
    """'file:line' of the innermost frame of `error`'s traceback in the config's folder."""
    where = "?"
    for frame in traceback.extract_tb(error.__traceback__):
        if os.path.dirname(os.path.abspath(frame.filename)) == folder:
            where = f"{frame.filename}:{frame.lineno}"
    return where


def replace_fields(cfg: ExperimentConfig, **sections: dict) -> ExperimentConfig:
    """`cfg` with fields of its sections replaced: `replace_fields(cfg, loss={"retrieval_weight": 0})`."""
    return dataclasses.replace(
        cfg, **{name: dataclasses.replace(getattr(cfg, name), **fields) for name, fields in sections.items()}
    )


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict, cls=ExperimentConfig):
    """The inverse of `to_dict` (JSON lists become tuples). Every section is built and checked;
    all their problems are raised together, keys prefixed by their section."""
    hints = _field_types(cls)
    kwargs, problems = {}, []
    for name, value in d.items():
        if name not in hints:
            problems.append(f"unknown config key {name!r} for {cls.__name__}")
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            try:
                value = from_dict(value, tp)
            except ConfigError as e:
                problems.extend(e.within(name).problems)
                continue
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    if problems:
        if cls is ExperimentConfig:
            # Sections that failed stand in as their values, with the failed fields named.
            given = {
                name: kwargs[name] if name in kwargs else types.SimpleNamespace(**value)
                for name, value in d.items()
                if dataclasses.is_dataclass(hints.get(name)) and isinstance(value, dict)
            }
            invalid = frozenset(m.group(1) for m in map(_PROBLEM_KEY.match, problems) if m)
            problems.extend(agreement_problems(given, invalid))
        raise ConfigError(problems)
    return cls(**kwargs)


_PROBLEM_KEY = re.compile(r"^(\w+\.\w+)=")  # the field a section's problem names: 'model.emb_size=0: ...'


def dumps(cfg: ExperimentConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2)
