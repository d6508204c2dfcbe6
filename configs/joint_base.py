"""Ranking and retrieval trained together on one set of hash tables, at a single-host GPU scale.

The original architecture (no extensions: they were measured on the synthetic worlds only).
`phoenix-train --config configs/joint_base.py --workdir W --config.data.data_dir=D`; plan it first
with `phoenix-plan --config configs/joint_base.py --devices 8`. Not trained here (no accelerator).
"""

from phoenix_flax.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    LossConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    TrainConfig,
)

BASE_MODEL = ModelConfig(
    emb_size=256,
    key_size=64,
    num_q_heads=8,
    num_kv_heads=4,
    num_layers=4,
    widening_factor=4.0,
    attn_output_multiplier=0.125,
    user_vocab_rows=1 << 22,
    post_vocab_rows=1 << 23,
    author_vocab_rows=1 << 21,
    history_len=128,
    num_candidates=32,
    dtype="bfloat16",
    scan_layers=True,  # one compiled layer body: compile time flat in depth
)


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="joint_base",
        model=BASE_MODEL,
        data=DataConfig(data_dir="data/prepared", batch_size=1024, worker_count=8),
        # FSDP rather than data parallelism: the tables (14 GiB) are sharded over the devices, not
        # replicated with their gradients all-reduced (phoenix-plan on 8 devices, with element-wise
        # table Adagrad: peak 56 -> 13 GiB).
        mesh=MeshConfig(data=1, fsdp=-1, model=1),
        optimizer=OptimizerConfig(learning_rate=5e-4, table_learning_rate=0.02, warmup_steps=2000),
        loss=LossConfig(ranking_weight=1.0, retrieval_weight=0.5, logq="estimated", frequency_buckets=1 << 22),
        checkpoint=CheckpointConfig(every_steps=2000, keep=3),
        eval=EvalConfig(every_steps=2000, batches=50),
        train=TrainConfig(steps=200_000, log_every=100),
    )
