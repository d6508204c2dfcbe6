"""The data section of an experiment: where the prepared sessions are and how they are read."""

from __future__ import annotations

import dataclasses

from phoenix_flax.validation import Checks


@dataclasses.dataclass(frozen=True)
class DataConfig:
    data_dir: str = "data/prepared"  # written by phoenix-prepare
    train_split: str = "train"
    eval_split: str = "validation"
    batch_size: int = 256  # global, over all processes
    worker_count: int = 0  # grain worker processes per host; 0 maps in the main process
    seed: int = 0  # of the per-epoch global shuffle
    positive_actions: tuple[str, ...] = ("favorite",)  # the retrieval positive: first candidate with one
    truth_file: str | None = None  # true probabilities of the test split (phoenix-synth's test_truth.npz)
    corpus_file: str | None = None  # posts for retrieval against the corpus (phoenix-synth's corpus.jsonl)

    def __post_init__(self):
        object.__setattr__(self, "positive_actions", tuple(self.positive_actions))
        checks = Checks(self).at_least(1, "batch_size").at_least(0, "worker_count")
        checks.require(bool(self.data_dir), "data_dir", "must name a directory")
        checks.require(bool(self.train_split), "train_split", "must name a split")
        checks.require(bool(self.positive_actions), "positive_actions", "must name at least one action")
        checks.raise_if_any()
