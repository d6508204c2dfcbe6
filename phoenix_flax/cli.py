"""What the programs share: running with one-line errors, multi-host start-up, configs from
arguments, step and input arguments, output checks."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Sequence

import jax

from phoenix_flax.config import ConfigError, ExperimentConfig, apply_overrides, load
from phoenix_flax.data.raw import Session, SkipReport, expand_paths, read_sessions
from phoenix_flax.errors import PhoenixError
from phoenix_flax.files import OutputError
from phoenix_flax.model.scoring import FeedScoring, parse_weights

DEBUG_ENV = "PHOENIX_DEBUG"


def add_beam_args(parser: argparse.ArgumentParser) -> None:
    """`--runner`: run as an Apache Beam pipeline (the `beam` extra); Beam's other pipeline
    options (`--temp_location`, `--num_workers`, `--project`, ...) pass through untouched."""
    parser.add_argument(
        "--runner",
        help="run as an Apache Beam pipeline on this runner (DirectRunner, DataflowRunner, FlinkRunner, "
        "SparkRunner; needs the beam extra); Beam's other options pass through",
    )


def check_beam_args(parser: argparse.ArgumentParser, args: argparse.Namespace, beam_args: Sequence[str]) -> None:
    """Arguments left over are Beam's pipeline options: only with --runner."""
    if beam_args and args.runner is None:
        parser.error(f"unrecognized arguments: {' '.join(beam_args)} (Beam's options go with --runner)")
    if args.runner is not None and importlib.util.find_spec("apache_beam") is None:
        parser.error("--runner needs Apache Beam: pip install 'phoenix-flax[beam]'")


def add_debug_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help=f"tracebacks for every error (or set {DEBUG_ENV}=1)")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's, with a bad argument reported in one line like every other failure (exit 2);
    `--help` shows the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    """An argument that must be a whole number >= 1 (sizes, counts)."""
    return _int_at_least(text, 1)


def count(text: str) -> int:
    """An argument that must be a whole number >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def run(prog: str, body: Callable[[], int], debug: bool = False) -> int:
    """Runs a program's body. An expected failure (bad input or config, a missing file, a
    damaged checkpoint, a busy workdir) is printed as one line and exits non-zero (2, or the
    error's `exit_code`); anything else is a bug and keeps its traceback. With `debug` (or
    PHOENIX_DEBUG=1) expected failures keep theirs too."""
    debug = debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return body()
    except (PhoenixError, OSError) as e:
        if debug:
            traceback.print_exc()
        message = str(e) if isinstance(e, PhoenixError) else f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130


def check_writable(path: str, what: str = "--output") -> None:
    """Fails now, before the work, if `path` cannot be written (its folder missing, read-only...)."""
    existed = os.path.exists(path)
    if os.path.isdir(path):
        raise OutputError(f"{what} {path} is a directory")
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise OutputError(f"cannot write {what} {path}: {e.strerror}") from None
    if not existed:
        os.remove(path)


def check_writable_dir(path: str, what: str) -> None:
    """Fails now, before the work, if folder `path` cannot be made or written."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"{what} {path} is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot make {what} {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise OutputError(f"cannot write {what} {path}: not writable")


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
        raise ConfigError("multi-host runs need --coordinator-address, --num-processes and --process-id")
    # Cross-process collectives between CPU devices (tests, CPU-only clusters); other backends ignore it.
    # Set before initialize: querying the backend here would start it too early.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)


def experiment_from_args(config_path: str, overrides: list[str], data_dir: str | None) -> ExperimentConfig:
    """The config file with `--config.a.b=v` overrides (and --data-dir); ConfigError names every problem."""
    if data_dir is not None:
        overrides = [*overrides, f"--config.data.data_dir={data_dir}"]
    try:
        return apply_overrides(load(config_path), overrides)
    except ConfigError as e:
        raise ConfigError([f"config: {p}" for p in e.problems]) from None


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


def add_scoring_args(parser: argparse.ArgumentParser) -> None:
    """The final score: action weights and the feed scorer's optional steps (`scoring.py`)."""
    parser.add_argument("--weights", help="score weights, e.g. favorite=1,report=-20 (others: the defaults)")
    parser.add_argument(
        "--offset-negatives",
        type=float,
        metavar="OFFSET",
        help="split the score into positive and negative parts; net negative scores go into [0, OFFSET), "
        "below every positive one (small, e.g. 0.001)",
    )
    parser.add_argument(
        "--author-decay",
        type=float,
        metavar="DECAY",
        help="author diversity: an author's k-th post in score order is multiplied by (1-floor)*DECAY**k+floor",
    )
    parser.add_argument("--author-floor", type=float, default=0.0, help="the floor of --author-decay (default 0)")
    parser.add_argument(
        "--out-of-network-factor",
        type=float,
        default=1.0,
        metavar="F",
        help='multiply the scores of candidates marked "in_network": false by F (default 1)',
    )


def scoring_from_args(args: argparse.Namespace) -> tuple[dict[str, float], FeedScoring]:
    """(weight overrides, feed-scorer options) of `add_scoring_args`; WeightsError names a bad one."""
    feed = FeedScoring(args.offset_negatives, args.author_decay, args.author_floor, args.out_of_network_factor)
    return parse_weights(args.weights), feed


def add_session_input_args(parser: argparse.ArgumentParser) -> None:
    """The arguments of the serving programs: a checkpoint, sessions in, results out."""
    add_checkpoint_args(parser)
    parser.add_argument("--input", required=True, nargs="+", help="sessions (.jsonl or .parquet; globs allowed)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--skip-invalid", action="store_true", help="skip invalid sessions and report them")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="sessions per user-context batch")
    add_debug_arg(parser)


def read_session_input(
    args: argparse.Namespace, model_cfg, require_candidates: bool = True
) -> tuple[list[Session], SkipReport]:
    """The sessions of `--input`, checked against the checkpoint's action and surface vocabularies."""
    report = SkipReport()
    read = read_sessions(
        expand_paths(args.input),
        model_cfg.actions,
        skip_invalid=args.skip_invalid,
        report=report,
        require_candidates=require_candidates,
        surface_vocab_size=model_cfg.product_surface_vocab_size,
    )
    return [s for _, s in read], report


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)
