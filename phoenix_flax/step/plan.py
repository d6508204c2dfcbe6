"""A dry run of the training step: compile it ahead of time and read XLA's own figures.

Nothing is allocated: the model, optimizer state and batch are abstract (shapes, dtypes and
shardings), so production shapes can be planned on a laptop with simulated devices. The
figures are per device: argument, temporary and output bytes (`memory_analysis`), FLOPs
(`cost_analysis`), the collectives in the compiled program with their count and bytes, the
compile time, and how many involuntary full rematerializations the SPMD partitioner reported
(it logs one where it cannot reshard a tensor and replicates it instead).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import tempfile
import time
from collections import Counter

import jax
import jax.numpy as jnp
from flax import nnx

from phoenix_flax.config import ExperimentConfig
from phoenix_flax.data.batch import DEVICE_FIELDS, batch_shapes
from phoenix_flax.sharding import abstract_sharded, logical_sharding, make_mesh, use_mesh
from phoenix_flax.step.step import new_train_state, train_step_fn

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
REMAT_MESSAGE = "Involuntary full rematerialization"
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4}
_DTYPE_BYTES |= {"s64": 8, "u64": 8, "f64": 8}


@dataclasses.dataclass
class StepPlan:
    """What one training step costs on each device."""

    devices: int
    mesh: dict[str, int]
    argument_bytes: int
    temp_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs that reuse donated arguments' buffers
    flops: float
    collectives: dict[str, dict[str, int]]  # kind -> {"count", "bytes"}
    compile_seconds: float
    involuntary_rematerializations: int
    parameter_bytes: int  # of the model's parameters, per device
    table_bytes: int  # of the hash tables among them, per device

    @property
    def peak_bytes(self) -> int:
        """Arguments, temporaries and the outputs that do not reuse a donated buffer."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "peak_bytes": self.peak_bytes}


def _communicates(line: str) -> bool:
    """False for a collective whose replica groups each hold one device (over axes of size 1):
    XLA may keep those, but they move nothing."""
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
    if iota:
        return int(iota.group(2)) > 1
    listed = re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", line)
    if listed:
        return any("," in group for group in re.findall(r"\{([\d,]*)\}", listed.group(1)))
    return True


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """Count and result bytes of each kind of collective in compiled HLO that moves data (async
    pairs once). Ops are counted as the program text holds them: one inside a loop body (a
    scanned layer, the embedding ring) counts once, not once per iteration."""
    out: dict[str, dict[str, int]] = {}
    pattern = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
    for line in hlo_text.splitlines():
        m = pattern.search(line)
        if not m or not _communicates(line):
            continue
        size = 0
        for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", m.group(1)):
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            size += n * _DTYPE_BYTES.get(dtype, 4)
        entry = out.setdefault(m.group(2), {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += size
    return out


@contextlib.contextmanager
def _captured_stderr():
    """The compiler's log (C++ writes to file descriptor 2) -> `text[0]` after the block."""
    text = [""]
    with tempfile.TemporaryFile(mode="w+b") as f:
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            yield text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            text[0] = f.read().decode(errors="replace")


def plan_train_step(cfg: ExperimentConfig, devices=None) -> StepPlan:
    """Compiles the training step of `cfg` for the mesh over `devices` (default: all) and reads
    its figures; allocates neither the model nor a batch."""
    mesh = make_mesh(cfg.mesh.axis_sizes(), devices)
    rules = cfg.mesh.logical_rules()
    # Shapes alone (outside the mesh: eval_shape cannot attach shardings to optax's masked
    # states); the shardings follow from the variables' logical names and the rules.
    abstract = nnx.eval_shape(lambda: new_train_state(cfg, steps_per_epoch=1.0))  # compiles the same for any
    with use_mesh(mesh, rules):
        graphdef, state = nnx.split(abstract)
        state = abstract_sharded(state, mesh, rules)
        shardings = jax.tree.map(lambda x: x.sharding, state)
        body = train_step_fn(cfg.loss)

        def step(state, batch):
            model, optimizer = nnx.merge(graphdef, state)
            metrics = body(model, optimizer, batch)
            return nnx.state((model, optimizer)), metrics

        batch_sharding = logical_sharding(mesh, ("batch",), rules)
        batch = {
            k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
            for k, (shape, dtype) in batch_shapes(cfg.model, cfg.data.batch_size, cfg.data).items()
            if k in DEVICE_FIELDS
        }
        lowered = jax.jit(step, donate_argnums=0, out_shardings=(shardings, None)).lower(state, batch)
        with _captured_stderr() as log:
            start = time.perf_counter()
            compiled = lowered.compile()
            seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost

    def per_device(tree) -> int:
        """Bytes of one device's shards of the arrays of an abstract state."""
        leaves = jax.tree.leaves(abstract_sharded(tree, mesh, rules))
        return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves)

    params = nnx.state(abstract[0], nnx.Param)
    tables = nnx.state(abstract[0].embeddings, nnx.Param)
    return StepPlan(
        devices=mesh.size,
        mesh=dict(mesh.shape),
        argument_bytes=int(memory.argument_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        flops=float(cost.get("flops", 0.0)),
        collectives=collectives(compiled.as_text()),
        compile_seconds=seconds,
        involuntary_rematerializations=log[0].count(REMAT_MESSAGE),
        parameter_bytes=per_device(params),
        table_bytes=per_device(tables),
    )


def count_by_kind(plan: StepPlan) -> Counter:
    return Counter({k: v["count"] for k, v in plan.collectives.items()})
