"""`phoenix-plan`: what the training step of a config costs per device, before renting devices.

    phoenix-plan --config CONFIG [--devices N] [--hbm 16GiB] [--json] [--config.a.b=v ...]

Compiles the real training step ahead of time, for this machine's devices or, with --devices,
N simulated CPU devices, without allocating the model or a batch, and prints per device the
argument, temporary and output bytes, FLOPs per step, the collectives with their count and
bytes, the compile time and the involuntary rematerializations the compiler reported. With
--hbm it exits 1, naming the shortfall, when the step does not fit in that much memory.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence

from phoenix_flax.cli import ArgumentParser, add_debug_arg, experiment_from_args, positive_int, run

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'16GiB', '80GB', '512MiB', '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([\d.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 16GiB or 80GB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_plan(plan, hbm: int | None) -> str:
    lines = [
        f"mesh {plan.mesh} ({plan.devices} devices); per device:",
        f"  arguments    {gib(plan.argument_bytes):>12}   (parameters {gib(plan.parameter_bytes)}, of which tables {gib(plan.table_bytes)})",
        f"  temporaries  {gib(plan.temp_bytes):>12}",
        f"  outputs      {gib(plan.output_bytes):>12}   ({gib(plan.alias_bytes)} reuse donated arguments)",
        f"  peak         {gib(plan.peak_bytes):>12}" + (f"   of {gib(hbm)}" if hbm else ""),
        f"  FLOPs/step   {plan.flops:>12.3e}",
        f"  compile      {plan.compile_seconds:>10.1f} s",
        f"  involuntary rematerializations: {plan.involuntary_rematerializations}",
        "  collectives: "
        + (
            ", ".join(f"{k} x{v['count']} ({v['bytes'] / 2**20:,.1f} MiB)" for k, v in sorted(plan.collectives.items()))
            or "none"
        ),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="phoenix-plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a file in configs/ defining get_config()")
    p.add_argument("--devices", type=positive_int, help="plan for this many simulated CPU devices")
    p.add_argument("--hbm", type=parse_bytes, help="memory per device, e.g. 16GiB: exit 1 if the step does not fit")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_debug_arg(p)
    args, overrides = p.parse_known_args(argv)
    return run(p.prog, lambda: plan_from_args(args, overrides), args.debug)


def plan_from_args(args: argparse.Namespace, overrides: list[str]) -> int:
    cfg = experiment_from_args(args.config, overrides, None)
    import jax

    if args.devices:  # before the backend starts
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.devices)
    from phoenix_flax.step.plan import plan_train_step  # JAX starts here

    plan = plan_train_step(cfg)
    fits = args.hbm is None or plan.peak_bytes <= args.hbm
    if args.json:
        print(json.dumps({**plan.to_dict(), "hbm_bytes": args.hbm, "fits": fits}))
    else:
        print(format_plan(plan, args.hbm))
    if not fits:
        print(
            f"phoenix-plan: the step needs {gib(plan.peak_bytes)} per device, {gib(plan.peak_bytes - args.hbm)} "
            f"more than --hbm {gib(args.hbm)}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
