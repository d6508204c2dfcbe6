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
    # Packed training rows (an option; evaluation reads a session a row): up to `pack_sessions`
    # sessions a row, their [user, history] positions in `pack_prefix` and their candidates in
    # `pack_candidates` slots, instead of a session a row padded to model.history_len. batch_size
    # then counts rows (the action bias's prior, an extension, still takes an epoch as sessions /
    # batch_size steps). 0: no packing.
    pack_prefix: int = 0
    pack_candidates: int = 0
    pack_sessions: int = 0

    def __post_init__(self):
        object.__setattr__(self, "positive_actions", tuple(self.positive_actions))
        checks = Checks(self).at_least(1, "batch_size").at_least(0, "worker_count", "pack_prefix")
        if self.pack_prefix:
            checks.at_least(1, "pack_candidates", "pack_sessions")
        checks.require(bool(self.data_dir), "data_dir", "must name a directory")
        checks.require(bool(self.train_split), "train_split", "must name a split")
        checks.require(bool(self.positive_actions), "positive_actions", "must name at least one action")
        checks.raise_if_any()

    @property
    def packed(self) -> bool:
        """Training rows pack several sessions (`pack_prefix` > 0)."""
        return self.pack_prefix > 0
