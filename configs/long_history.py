"""Long engagement histories: 1024 history items and 64 candidates per session, D 512.

The shape production rankers train at. Blockwise attention keeps memory linear in the history;
scanned layers with full rematerialization keep one layer's activations at a time. Planned with
`phoenix-plan --config configs/long_history.py --devices 8` (docs/scale.md; about a minute to
compile on 2 CPU cores). Not trained here (no accelerator). Packed sessions, with two padded
rows' tokens a row: add `--config.data.batch_size=128 --config.data.pack_prefix=1922
--config.data.pack_candidates=256 --config.data.pack_sessions=8` (docs/packing.md).
"""

import dataclasses

import joint_base

from phoenix_flax.config import MeshConfig, replace_fields


def get_config():
    cfg = replace_fields(
        joint_base.get_config(),
        model={
            "emb_size": 512, "key_size": 64, "num_q_heads": 8, "num_kv_heads": 4, "num_layers": 4,
            "history_len": 1024, "num_candidates": 64, "remat": "full",
        },
        data={"batch_size": 256},
    )  # fmt: skip
    return dataclasses.replace(cfg, name="long_history", mesh=MeshConfig(data=1, fsdp=-1, model=1))
