"""Packed sessions against sessions padded to the longest history: training sessions/s, side by side.

Sessions with histories of 16 to 1,024 items, Beta(2, 2)-distributed (mean 520), and 8 candidates
each; the demo's model (original architecture) with `history_len` 1,024. Padded: a session a row,
`--rows` rows of 1 + 1,024 prefix positions and 8 candidates. Packed (`data.pack_prefix`): half
as many rows, each of 64 candidate slots and 2 x (1 + 1,024 + 8) - 64 prefix positions (the tokens
of two padded rows), up to 8 sessions. Both come out of the project's pipeline (grain's first-fit
packing) and go through its training step, rounds interleaved; prints for each the sessions a step,
ms a step, sessions/s, the pipeline's own sessions/s, and the step's per-device temporaries and
arguments as phoenix-plan reads them (`plan_train_step`).
    python bench/packing.py [--rows 8] [--steps 5] [--rounds 3] [--config.k=v ...]
"""

from __future__ import annotations

import argparse
import sys
import time

import grain
import jax
import numpy as np
from flax import nnx

from phoenix_flax.config import apply_overrides, load, replace_fields
from phoenix_flax.data.pipeline import SessionToExamples, batch_examples, global_batch
from phoenix_flax.sharding import make_mesh
from phoenix_flax.step.plan import plan_train_step
from phoenix_flax.step.step import create_train_state, make_train_step

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from train_step import ORIGINAL, STEPS_PER_EPOCH

HISTORY, CANDIDATES, SHORTEST = 1024, 8, 16
PACK_CANDIDATES, PACK_SESSIONS = 64, 8


def sessions(n: int, actions: int, seed: int = 0) -> list[dict]:
    """Raw sessions as the prepared dataset holds them, histories Beta(2, 2) between 16 and 1,024."""
    rng = np.random.default_rng(seed)
    lengths = SHORTEST + np.round(rng.beta(2, 2, n) * (HISTORY - SHORTEST)).astype(int)
    out = []
    for i, length in enumerate(lengths):
        session = {"user_id": int(rng.integers(1, 2000)), "session_id": i, "labeled": True}
        for part, size in (("history", length), ("candidate", CANDIDATES)):
            session[f"{part}_post_id"] = rng.integers(1, 5000, size)
            session[f"{part}_author_id"] = rng.integers(1, 200, size)
            session[f"{part}_product_surface"] = rng.integers(0, 3, size)
            session[f"{part}_actions"] = np.bitwise_or.reduce(
                np.int64(1) << rng.integers(0, actions, (size, 2)), axis=1
            ) * (rng.random(size) < 0.5)  # fmt: skip
        out.append(session)
    return out


def batches(cfg, raw: list[dict], count: int, packed: bool) -> tuple[list[dict], float]:
    """`count` batches of `raw` (repeated) through the pipeline, and its sessions/s producing them."""
    examples = grain.experimental.FlatMapIterDataset(
        grain.MapDataset.source(raw).repeat(None).to_iter_dataset(), SessionToExamples(cfg.model)
    )
    it = iter(batch_examples(examples, cfg.model, cfg.data, cfg.model.actions, cfg.data.batch_size, packed=packed))
    start = time.perf_counter()
    out = [next(it) for _ in range(count)]
    return out, sum(map(sessions_in, out)) / (time.perf_counter() - start)


def sessions_in(batch: dict) -> int:
    return int(np.count_nonzero(batch["user_hashes"][..., 0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=8, help="padded rows a step (packed: half)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args, overrides = parser.parse_known_args()
    base = apply_overrides(load("configs/demo.py"), [*ORIGINAL, f"--config.model.history_len={HISTORY}", *overrides])
    padded = replace_fields(base, data={"batch_size": args.rows})
    pack_prefix = 2 * (1 + HISTORY + CANDIDATES) - PACK_CANDIDATES
    packed = replace_fields(
        base,
        data={
            "batch_size": args.rows // 2,
            "pack_prefix": pack_prefix,
            "pack_candidates": PACK_CANDIDATES,
            "pack_sessions": PACK_SESSIONS,
        },
    )
    raw = sessions(4000, len(base.model.actions))
    lengths = np.array([len(s["history_post_id"]) for s in raw])
    print(
        f"{jax.devices()[0].platform}: histories {lengths.min()} to {lengths.max()} (mean {lengths.mean():.0f}), "
        f"{CANDIDATES} candidates; demo model, original architecture, history_len {HISTORY}; "
        f"best of {args.rounds} rounds of {args.steps} steps"
    )
    runs = {}
    for name, cfg, is_packed in (("padded", padded, False), ("packed", packed, True)):
        data, pipeline_rate = batches(cfg, raw, 1 + args.steps * args.rounds, is_packed)
        mesh = make_mesh(cfg.mesh.axis_sizes())
        model, optimizer = create_train_state(cfg, mesh, STEPS_PER_EPOCH)
        step = nnx.cached_partial(make_train_step(cfg.loss), model, optimizer)
        device = [global_batch(b, mesh) for b in data]
        jax.block_until_ready(step(device[0]))  # compile
        plan = plan_train_step(cfg)
        runs[name] = {"step": step, "batches": device[1:], "sessions": data[1:], "times": []}
        runs[name] |= {"pipeline": pipeline_rate, "plan": plan, "rows": cfg.data.batch_size}
    for r in range(args.rounds):
        for run in runs.values():
            chunk = slice(r * args.steps, (r + 1) * args.steps)
            start = time.perf_counter()
            for batch in run["batches"][chunk]:
                out = run["step"](batch)
            jax.block_until_ready(out)
            run["times"].append(
                ((time.perf_counter() - start) / args.steps, sum(map(sessions_in, run["sessions"][chunk])))
            )
    print(
        f"{'':<8}{'rows':>6}{'sessions/step':>15}{'ms/step':>10}{'sessions/s':>12}{'pipeline/s':>12}"
        f"{'temporaries':>13}{'arguments':>11}"
    )
    rates = {}
    for name, run in runs.items():  # the round of the most sessions/s
        seconds, count = max(run["times"], key=lambda t: t[1] / t[0])
        per_step = count / args.steps
        rates[name] = per_step / seconds
        gib = 2**30
        print(
            f"{name:<8}{run['rows']:>6}{per_step:>15.1f}{seconds * 1e3:>10.0f}{rates[name]:>12.1f}{run['pipeline']:>12.0f}"
            f"{run['plan'].temp_bytes / gib:>9.3f} GiB{run['plan'].argument_bytes / gib:>7.3f} GiB"
        )
    temps = runs["packed"]["plan"].temp_bytes / runs["padded"]["plan"].temp_bytes
    print(f"packed / padded: {rates['packed'] / rates['padded']:.2f}x sessions/s, {temps:.2f}x temporaries")


if __name__ == "__main__":
    main()
