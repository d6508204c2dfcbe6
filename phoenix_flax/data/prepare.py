"""Raw session files -> a TFDS dataset in ArrayRecord format (the library of `phoenix-prepare`).

The dataset keeps raw int64 IDs and variable lengths; actions are int64 bitmasks over the
vocabulary saved in the dataset's metadata. Generation streams the inputs, and TFDS's writer
spills its shuffle buffer to disk, so memory stays bounded for inputs larger than RAM. The
same inputs give the same dataset.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer
from tensorflow_datasets.core import writer as tfds_writer
from tensorflow_datasets.core.example_parser import tf_example_pb2
from tqdm import tqdm

from phoenix_flax.config import DEFAULT_ACTIONS
from phoenix_flax.data.raw import Session, SkipReport, read_sessions
from phoenix_flax.errors import DatasetError
from phoenix_flax.files import replaced

DATASET_NAME = "phoenix_sessions"
STATISTICS_FILE = "statistics.json"


def _sequence(dtype) -> tfds.features.Tensor:
    return tfds.features.Tensor(shape=(None,), dtype=dtype)


FEATURES = {
    "session_id": np.int64,
    "user_id": np.int64,
    "history_post_id": _sequence(np.int64),
    "history_author_id": _sequence(np.int64),
    "history_product_surface": _sequence(np.int32),
    "history_actions": _sequence(np.int64),
    "candidate_post_id": _sequence(np.int64),
    "candidate_author_id": _sequence(np.int64),
    "candidate_product_surface": _sequence(np.int32),
    "candidate_actions": _sequence(np.int64),
    "labeled": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class SplitSource:
    """Where a split's sessions come from: files, and optionally a hashed fraction of them."""

    paths: tuple[str, ...]
    lo: float = 0.0  # keep sessions whose hash falls in [lo, hi)
    hi: float = 1.0
    seed: int = 0

    def keeps(self, key: str) -> bool:
        if (self.lo, self.hi) == (0.0, 1.0):
            return True
        u = zlib.crc32(f"{self.seed}:{key}".encode()) / 2**32
        return self.lo <= u < self.hi


def session_example(session: Session) -> bytes:
    """A session as the serialized `tf.train.Example` TFDS writes for `FEATURES` (every field an
    int64 list: scalars of one value, bools as 0 or 1), built directly: TFDS's generic encoding
    and serialization of the same fields ran at ~1,700 sessions a second."""
    example = tf_example_pb2.Example()
    feature = example.features.feature
    for name in FEATURES:
        value = getattr(session, name)
        feature[name].int64_list.value.extend([int(value)] if name in _SCALARS else value.tolist())
    return example.SerializeToString(deterministic=True)  # map entries by key: the same bytes in every process


_SCALARS = frozenset(name for name, feature in FEATURES.items() if feature in (np.int64, np.bool_))


class _Serialized(example_serializer.Serializer):
    """For TFDS's writer: examples arrive serialized (`session_example`)."""

    def serialize_example(self, example: bytes) -> bytes:
        return example


class SplitStatistics:
    """Sessions, mean lengths and per-action rates of one split."""

    def __init__(self, actions: Sequence[str]):
        self.actions = tuple(actions)
        self.bits = np.int64(1) << np.arange(len(actions), dtype=np.int64)
        self.sessions = self.labeled = self.history_items = self.candidates = self.labeled_candidates = 0
        self.history_counts = np.zeros(len(actions), np.int64)
        self.candidate_counts = np.zeros(len(actions), np.int64)
        self.max_product_surface = -1
        self._pending: list[Session] = []  # counted in bulk: numpy calls per session cost more than the counting

    def add(self, s: Session) -> None:
        self.sessions += 1
        self.history_items += len(s.history_post_id)
        self.candidates += len(s.candidate_post_id)
        if s.labeled:
            self.labeled += 1
            self.labeled_candidates += len(s.candidate_post_id)
        self._pending.append(s)
        if len(self._pending) == 4096:
            self._count_pending()

    def merge(self, other: SplitStatistics) -> None:
        """Adds another part's counts (the Beam pipeline counts a file a task)."""
        self._count_pending()
        other._count_pending()
        self.sessions += other.sessions
        self.labeled += other.labeled
        self.history_items += other.history_items
        self.candidates += other.candidates
        self.labeled_candidates += other.labeled_candidates
        self.history_counts += other.history_counts
        self.candidate_counts += other.candidate_counts
        self.max_product_surface = max(self.max_product_surface, other.max_product_surface)

    def _count_pending(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        history = np.concatenate([s.history_actions for s in pending])
        labeled = np.concatenate([s.candidate_actions for s in pending if s.labeled] + [np.zeros(0, np.int64)])
        self.history_counts += ((history[:, None] & self.bits) != 0).sum(0)
        self.candidate_counts += ((labeled[:, None] & self.bits) != 0).sum(0)
        surfaces = np.concatenate(
            [x for s in pending for x in (s.history_product_surface, s.candidate_product_surface)]
        )
        if len(surfaces):
            self.max_product_surface = max(self.max_product_surface, int(surfaces.max()))

    def to_dict(self) -> dict:
        self._count_pending()

        def rates(counts, n):
            return {a: float(c) / n if n else 0.0 for a, c in zip(self.actions, counts, strict=True)}

        n = max(self.sessions, 1)
        return {
            "sessions": self.sessions,
            "labeled_sessions": self.labeled,
            "mean_history_length": self.history_items / n,
            "mean_candidates": self.candidates / n,
            "max_product_surface": self.max_product_surface,  # the model's surface vocabulary must cover it
            "history_action_rates": rates(self.history_counts, self.history_items),
            "candidate_action_rates": rates(self.candidate_counts, self.labeled_candidates),
        }


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    """The info of a dataset built here: TFDS's bucket has none to fetch for it. (TFDS's own
    `initialize_from_bucket`, called for a dataset not yet prepared, makes a temporary directory
    before finding that out and never removes it: an empty /tmp/tmp*tfds per prepare.)"""

    def initialize_from_bucket(self) -> None:
        pass


class PhoenixSessions(tfds.core.GeneratorBasedBuilder):
    """Engagement sessions: a user, their history, the candidates shown and what they did."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(
        self,
        *,
        sources: dict[str, SplitSource] | None = None,
        actions: Sequence[str] = DEFAULT_ACTIONS,
        skip_invalid: bool = False,
        beam_options=None,
        **kwargs,
    ):
        self._sources = sources or {}
        self._actions = tuple(actions)
        self._skip_invalid = skip_invalid
        self._beam_options = beam_options  # a Beam pipeline writes the splits (`data/beam.py`)
        self.statistics: dict[str, dict] = {}
        self.skip_reports: dict[tuple[str, ...], SkipReport] = {}  # one per distinct input set
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return _LocalDatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict(FEATURES),
            metadata=tfds.core.MetadataDict(actions=list(self._actions)),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only
        return {split: self._generate_examples(split) for split in self._sources}

    def _generate_examples(self, split: str):
        """(key, serialized example) of the split's sessions."""
        source = self._sources[split]
        report = self.skip_reports[source.paths] = SkipReport()  # each pass over the inputs recounts
        stats = SplitStatistics(self._actions)
        for key, session in read_sessions(source.paths, self._actions, skip_invalid=self._skip_invalid, report=report):
            if source.keeps(key):
                stats.add(session)
                yield key, session_example(session)
        self.statistics[split] = stats.to_dict()

    def _generate_splits(self, dl_manager, download_config) -> list[tfds.core.SplitInfo]:
        """TFDS's own generation, less its generic encoding: the examples come serialized, and
        TFDS's writer shuffles (by the hashed key, spilling to disk), shards and writes them as
        it would have. With Beam options, a Beam pipeline does the same (`beam.beam_splits`)."""
        if self._beam_options is not None:
            from phoenix_flax.data.beam import beam_splits

            return beam_splits(self, self._beam_options, download_config.get_shard_config())
        infos = []
        for split, examples in self._split_generators(dl_manager).items():
            template = self._get_filename_template(split)
            writer = tfds_writer.Writer(
                serializer=_Serialized(self.info.features.get_serialized_info()),
                filename_template=template,
                hash_salt=split,
                disable_shuffling=False,
                example_writer=self._example_writer(),
                shard_config=download_config.get_shard_config(),
            )
            for key, example in tqdm(examples, desc=f"{split} sessions", unit=" sessions", mininterval=1.0):
                writer.write(key, example)
            shard_lengths, size = writer.finalize()
            infos.append(
                tfds.core.SplitInfo(name=split, shard_lengths=shard_lengths, num_bytes=size, filename_template=template)
            )
        return infos


def dataset_dir(data_dir: str) -> str:
    return os.path.join(data_dir, DATASET_NAME, str(PhoenixSessions.VERSION))


def prepare(
    data_dir: str,
    sources: dict[str, SplitSource],
    *,
    actions: Sequence[str] = DEFAULT_ACTIONS,
    skip_invalid: bool = False,
    overwrite: bool = False,
    beam_options=None,
) -> tuple[dict[str, dict], SkipReport]:
    """Writes the dataset under `data_dir`; returns per-split statistics and the skip report.
    `beam_options` (Beam's PipelineOptions): written by a Beam pipeline on their runner."""
    target = dataset_dir(data_dir)
    if os.path.exists(target):
        if not overwrite:
            raise DatasetError(f"{target} already exists; pass --overwrite to replace it")
        shutil.rmtree(target)
    builder = PhoenixSessions(
        data_dir=data_dir, sources=sources, actions=actions, skip_invalid=skip_invalid, beam_options=beam_options
    )
    with tempfile.TemporaryDirectory() as downloads:  # TFDS wants one; nothing is downloaded
        try:
            builder.download_and_prepare(download_dir=downloads, file_format="array_record")
        except AssertionError as e:
            if "No examples were yielded" not in str(e):
                raise
            empty = [s for s in sources if s not in builder.statistics or not builder.statistics[s]["sessions"]]
            raise DatasetError(f"split {empty[0] if empty else '?'!r} has no valid sessions: {e}") from None
    report = SkipReport()
    for r in builder.skip_reports.values():
        report.merge(r)
    with replaced(os.path.join(target, STATISTICS_FILE)) as f:
        json.dump({"splits": builder.statistics, "skipped": dict(report.counts)}, f, indent=2)
    return builder.statistics, report


def print_statistics(stats: dict[str, dict]) -> None:
    for split, s in stats.items():
        print(
            f"{split}: {s['sessions']:,} sessions ({s['labeled_sessions']:,} labeled), "
            f"mean history {s['mean_history_length']:.1f}, mean candidates {s['mean_candidates']:.1f}"
        )
        rates = " ".join(f"{a}={r:.3f}" for a, r in s["candidate_action_rates"].items())
        print(f"  candidate action rates: {rates}")
