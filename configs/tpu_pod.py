"""A multi-host deployment: 256 chips as data 8 x fsdp 16 x model 2, production batch and tables.

Launch one process per host (e.g. 64 hosts of 4 chips), each with --num-processes,
--process-id and --coordinator-address (or the JAX_* environment variables). Its consistency is
tested and its step planned (`phoenix-plan --config configs/tpu_pod.py --devices 256`, docs/scale.md);
it has not been run.
"""

import dataclasses

import joint_base

from phoenix_flax.config import MeshConfig, replace_fields
from phoenix_flax.sharding import DEFAULT_RULE_TEXT

NUM_CHIPS = 256
NUM_HOSTS = 64


def get_config():
    cfg = joint_base.get_config()
    cfg = replace_fields(
        cfg,
        model={
            "emb_size": 512,
            "key_size": 64,
            "num_q_heads": 16,
            "num_kv_heads": 8,
            "num_layers": 8,
            "user_vocab_rows": 1 << 27,
            "post_vocab_rows": 1 << 28,
            "author_vocab_rows": 1 << 25,
            "history_len": 256,
            "num_candidates": 64,
            "remat": "full",
        },
        data={"data_dir": "gs://phoenix/prepared", "batch_size": 65536, "worker_count": 16},
        optimizer={"learning_rate": 3e-4, "table_learning_rate": 0.01, "warmup_steps": 5000},
        loss={"frequency_buckets": 1 << 26},
        checkpoint={"every_steps": 5000, "keep": 5},
        eval={"every_steps": 5000, "batches": 100},
        train={"steps": 1_000_000, "log_every": 200},
    )
    # Table rows over every axis: over model x fsdp alone they would take 52 GiB per chip with
    # element-wise Adagrad's state (phoenix-plan, before row-wise Adagrad); over all 256 chips, 6.5 GiB.
    rules = tuple("vocab:data+fsdp+model" if r.startswith("vocab:") else r for r in DEFAULT_RULE_TEXT)
    return dataclasses.replace(cfg, name="tpu_pod", mesh=MeshConfig(data=8, fsdp=16, model=2, rules=rules))
