"""The demo: ranking and retrieval together on the synthetic world, on a CPU, in minutes.

`make demo` (or `phoenix-demo`) synthesizes the world, prepares it, trains this config and
evaluates the best checkpoint on the test split. The original architecture plus every extension
(phoenix_flax/extensions): the action bias with its affinity and Newton offsets, the exposure
softmax, and the post-hoc calibration shifts and count blend with its gate.

Expected on a 2-core CPU: about 9 minutes in all (training about 7); on the test split, 15/15
actions above the popularity baseline, about 89.5% of the oracle's AUC lift on average, 15/15
calibrated within [0.9, 1.1], weighted-score AUC about 0.80 (docs/results.md).
"""

from phoenix_flax.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    TrainConfig,
)


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="demo",
        model=ModelConfig(
            emb_size=64,
            key_size=16,
            num_q_heads=4,
            num_kv_heads=2,
            num_layers=2,
            # Tables well above the world's IDs (2000 users, 5000 posts, 200 authors), so that few
            # rows are shared: a per-post attribute such as media type stays sharp.
            user_vocab_rows=32768,
            post_vocab_rows=65536,
            author_vocab_rows=4096,
            history_len=16,
            num_candidates=8,
            # The extensions (docs/extensions.md has what each adds on the synthetic worlds).
            action_bias=True,
            affinity_rank=16,
            calibration=True,
            count_blend=True,
            count_gate=True,
        ),
        data=DataConfig(
            data_dir="runs/demo/prepared",
            batch_size=256,
            truth_file="runs/demo/world/test_truth.npz",
            corpus_file="runs/demo/world/corpus.jsonl",
        ),
        # 3e-3 for the dense weights: the demo's world still improves at the last step (bench/quality.py).
        optimizer=OptimizerConfig(learning_rate=3e-3, table_learning_rate=0.05, warmup_steps=100),
        # exposure_weight 0.1: an extension (docs/extensions.md has what it adds).
        loss=LossConfig(
            ranking_weight=1.0, retrieval_weight=0.2, exposure_weight=0.1, logq="estimated", frequency_buckets=1 << 16
        ),
        # The joint validation loss is dominated by retrieval; select models by the final score's
        # ranking quality.
        checkpoint=CheckpointConfig(every_steps=250, keep=2, best_metric="eval_weighted_auc", best_mode="max"),
        eval=EvalConfig(every_steps=250, batches=16),
        train=TrainConfig(steps=1500, log_every=50),
    )
