"""MovieLens-100K, imported by `phoenix-import` (`make demo-movielens`): next-item retrieval and
P(favorite), on a CPU in minutes.

Every rating is a `click` (the retrieval positive), a rating of 4 or 5 a `favorite` and one of 1
or 2 `not_interested`; each user's last rating is the test item and the one before it the
validation item (leave-last-out). Sessions hold one candidate after the 10 ratings before it.

The history is short on purpose: the retrieval user tower mean-pools its outputs over [user,
history], so a long history dilutes the recent ratings that predict the next one best, and a
short one makes a step cheap enough for more epochs. Chosen on the validation split (each user's
second-to-last rating; HR@10 with the history's items excluded, best checkpoint by validation
retrieval loss): history 10 and 2,000 steps 0.170, history 20 and 1,500 steps 0.150. The test
split, once, for history 10: HR@10 0.163, HR@20 0.247, NDCG@10 0.083, MRR 0.074 (popularity
0.084, 0.126, 0.043, 0.040); P(favorite) AUC 0.807 (the movie's training rate 0.735). About 14
minutes on 2 CPU cores (docs/results.md).
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

RUN = "runs/movielens"


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="movielens",
        model=ModelConfig(
            emb_size=64,
            key_size=16,
            num_q_heads=4,
            num_kv_heads=2,
            num_layers=2,
            # 943 users and 1,682 movies: tables far larger than the IDs, so few rows are shared.
            user_vocab_rows=16384,
            post_vocab_rows=32768,
            author_vocab_rows=64,  # the log has no authors: every movie's author is 0
            history_len=10,
            num_candidates=1,
        ),
        data=DataConfig(
            data_dir=f"{RUN}/prepared",
            batch_size=512,
            positive_actions=("click",),
            corpus_file=f"{RUN}/import/corpus.jsonl",
        ),
        # The table optimizer these figures were measured with (element-wise Adagrad; row-wise, the
        # default since, is not compared on MovieLens yet); the zero accumulator and the row decay
        # that the synthetic worlds train with are not measured on MovieLens yet either.
        optimizer=OptimizerConfig(
            table_optimizer="adagrad",
            learning_rate=2e-3,
            table_learning_rate=0.05,
            table_initial_accumulator=0.1,
            table_weight_decay=0.0,
            warmup_steps=100,
        ),
        loss=LossConfig(ranking_weight=1.0, retrieval_weight=1.0, logq="estimated", frequency_buckets=1 << 16),
        checkpoint=CheckpointConfig(every_steps=250, keep=2, best_metric="eval_retrieval_loss"),
        eval=EvalConfig(every_steps=250, batches=2),
        train=TrainConfig(steps=2000, log_every=50),
    )
