"""What the programs share: multi-host start-up, configs from arguments, step and input arguments."""

from __future__ import annotations

import argparse
import os
import sys

import jax

from phoenix_flax.config import ConfigError, ExperimentConfig, apply_overrides, load
from phoenix_flax.data.raw import Session, SkipReport, expand_paths, read_sessions


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("multi-host (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    g.add_argument("--coordinator-address", default=os.environ.get("JAX_COORDINATOR_ADDRESS"))
    g.add_argument("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"))
    g.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"))


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def initialize_distributed(args: argparse.Namespace) -> None:
    """`jax.distributed.initialize` when launched as several processes; nothing for one."""
    if args.num_processes is None or args.num_processes <= 1:
        return
    if args.coordinator_address is None or args.process_id is None:
        raise SystemExit("multi-host runs need --coordinator-address, --num-processes and --process-id")
    # Cross-process collectives between CPU devices (tests, CPU-only clusters); other backends ignore it.
    # Set before initialize: querying the backend here would start it too early.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)


def experiment_from_args(config_path: str, overrides: list[str], data_dir: str | None) -> ExperimentConfig:
    """The config file with `--config.a.b=v` overrides (and --data-dir); exits with the error."""
    try:
        cfg = apply_overrides(load(config_path), overrides)
        if data_dir is not None:
            cfg = apply_overrides(cfg, [f"--config.data.data_dir={data_dir}"])
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    return cfg


def step_arg(text: str) -> int | str:
    """A `--step` value: a step number, 'latest' or 'best'."""
    try:
        return int(text)
    except ValueError:
        if text not in ("latest", "best"):
            raise argparse.ArgumentTypeError(f"expected a step number, 'latest' or 'best', got {text!r}") from None
        return text


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", required=True, help="the training run's directory")
    parser.add_argument(
        "--step", type=step_arg, default="latest", help="a step, 'latest' or 'best' (by the run's best_metric)"
    )


def add_session_input_args(parser: argparse.ArgumentParser) -> None:
    """The arguments of the serving programs: a checkpoint, sessions in, results out."""
    add_checkpoint_args(parser)
    parser.add_argument("--input", required=True, nargs="+", help="sessions (.jsonl or .parquet; globs allowed)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--skip-invalid", action="store_true", help="skip invalid sessions and report them")
    parser.add_argument("--batch-size", type=int, default=64, help="sessions per user-context batch")


def read_session_input(
    args: argparse.Namespace, actions, require_candidates: bool = True
) -> tuple[list[Session], SkipReport]:
    """The sessions of `--input`, parsed with the checkpoint's action vocabulary."""
    report = SkipReport()
    read = read_sessions(
        expand_paths(args.input),
        actions,
        skip_invalid=args.skip_invalid,
        report=report,
        require_candidates=require_candidates,
    )
    return [s for _, s in read], report


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)
