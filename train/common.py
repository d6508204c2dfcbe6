"""What the training and evaluation programs share: multi-host start-up, configs, metric files."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

from phoenix_flax.experiment import ConfigError, ExperimentConfig, apply_overrides, load


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


class MetricWriter:
    """Metrics as JSON Lines (`metrics.jsonl`) and TensorBoard event files, from process 0 only."""

    def __init__(self, workdir: str, name: str = "metrics"):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, f"{name}.jsonl")
        self.jsonl = open(self.path, "a")
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)
