"""The grain pipeline: prepared sessions -> hashed, fixed-shape, per-process numpy batches.

    source (SessionRecords) -> global shuffle per epoch -> repeat -> this process's 1/P
    -> session to examples of C candidates -> batch -> hash IDs -> [worker processes]

A session with more than C candidates becomes several examples (candidates never attend to
each other, so splitting them changes no score); none is dropped. `global_batch` turns a
process's batch into a sharded global `jax.Array` batch.

Packed (`data.pack_prefix`, `make_dataset(packed=True)`): each example becomes variable-length
arrays (`ExampleToPackable`), grain's first-fit packing puts several in a fixed row (its
checkpointable state is the iterator's), and `HashPackedBatch` hashes the rows into the layout
of `data.batch.PACKED_FIELDS`.
"""

from __future__ import annotations

import bisect
import json
import threading
from collections.abc import Mapping, Sequence

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from array_record.python import array_record_module
from etils import epath
from google.protobuf import json_format, message
from tensorflow_datasets.core.example_parser import tf_example_pb2

from phoenix_flax.config import ModelConfig
from phoenix_flax.config.data import DataConfig
from phoenix_flax.data.batch import DEVICE_FIELDS, pad_batch
from phoenix_flax.data.hashing import fingerprint, hash_ids
from phoenix_flax.data.prepare import DATASET_NAME, FEATURES, STATISTICS_FILE, PhoenixSessions, dataset_dir  # noqa: F401
from phoenix_flax.errors import DatasetError
from phoenix_flax.sharding import DEFAULT_RULES, LogicalRules, logical_sharding


def _prepared(data_dir: str):
    """The dataset's builder, its info read; DatasetError when `data_dir` holds no prepared
    dataset (TFDS would otherwise try to generate one there) or a damaged one."""
    if not epath.Path(dataset_dir(data_dir), "dataset_info.json").exists():
        raise DatasetError(f"no prepared dataset in {data_dir} (phoenix-prepare writes it to {dataset_dir(data_dir)})")
    try:
        builder = tfds.builder(DATASET_NAME, data_dir=data_dir)
        builder.info.metadata["actions"]  # read now: a damaged metadata.json fails here
    except (ValueError, KeyError, TypeError, OSError, json_format.Error) as e:  # JSON errors are ValueErrors
        raise _damaged(f"the prepared dataset in {dataset_dir(data_dir)}", e) from None
    return builder


def _damaged(what: str, error: Exception) -> DatasetError:
    """`what` (the dataset, or one of its files) cannot be read as written."""
    return DatasetError(
        f"{what} is damaged ({type(error).__name__}: {str(error)[:200]}): "
        "prepare the dataset again (phoenix-prepare --overwrite)"
    )


def dataset_actions(data_dir: str) -> tuple[str, ...]:
    """The action vocabulary the dataset's bitmasks refer to."""
    return tuple(_prepared(data_dir).info.metadata["actions"])


def dataset_splits(data_dir: str) -> set[str]:
    return set(_prepared(data_dir).info.splits)


def dataset_statistics(data_dir: str) -> dict:
    """What phoenix-prepare measured of each split (`statistics.json`; {} when absent)."""
    path = epath.Path(dataset_dir(data_dir), STATISTICS_FILE)
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except ValueError as e:
        raise _damaged(f"the prepared dataset in {dataset_dir(data_dir)}", e) from None


class SessionRecords:
    """A split's sessions, `{field: numpy value}` by index (grain's random-access source).

    The split's ArrayRecord shards are read directly and each record parsed straight from its
    `tf.train.Example` into the FEATURES' dtypes. TFDS's data source reads one record as a list
    of one position, which cost ArrayRecord ~0.2 ms a call against ~0.01 ms for a range of one
    (the whole pipeline waited on it); TFDS's generic decoding took three times as long as the
    read itself (0.35 against 0.11 ms a record), and the pipeline shares the CPU with the step."""

    def __init__(self, data_dir: str, split: str, fields: Sequence[str] | None = None):
        """`fields`: the FEATURES to parse (default: all)."""
        splits = _prepared(data_dir).info.splits  # one read of the dataset's info
        if split not in splits:
            raise DatasetError(f"the dataset in {data_dir} has no split {split!r} (it has {sorted(splits)})")
        self.data_dir, self.split = data_dir, split
        unknown = set(fields or ()) - set(FEATURES)
        if unknown:
            raise ValueError(f"fields {sorted(unknown)} are not among the dataset's {list(FEATURES)}")
        self._fields = tuple(t for t in _FIELD_TYPES if fields is None or t[0] in fields)
        info = splits[split]
        self._files = [str(path) for path in info.filepaths]
        self._starts = [int(x) for x in np.cumsum([0, *info.shard_lengths])]  # shards' first indices; the total
        self._open()

    def _open(self) -> None:
        self._readers: list = [None] * len(self._files)  # opened on first use
        self._lock = threading.Lock()  # a reader is used by one thread at a time

    def __getstate__(self) -> dict:  # grain's worker processes get the source pickled
        return {k: v for k, v in self.__dict__.items() if k not in ("_readers", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, index: int) -> tuple[int, int]:
        """A split's record index -> (shard, position in the shard)."""
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of split {self.split!r}, which has {len(self)}")
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, index - self._starts[shard]

    def _read(self, shard: int, positions: Sequence[int]) -> list[bytes]:
        """Records of a shard; a damaged file (truncated, altered) raises DatasetError naming it."""
        try:
            if self._readers[shard] is None:
                self._readers[shard] = array_record_module.ArrayRecordReader(
                    self._files[shard], "readahead_buffer_size:0"
                )
            return self._readers[shard].read(list(positions))
        except (RuntimeError, OSError, ValueError) as e:
            raise _damaged(self._files[shard], e) from None

    def __getitem__(self, index: int) -> dict:
        shard, position = self._locate(index)
        with self._lock:
            (record,) = self._read(shard, [position])
        return self._parse(record, index)

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        by_shard: dict[int, list[tuple[int, int]]] = {}  # shard -> [(position, place in the answer)]
        for place, index in enumerate(indices):
            shard, position = self._locate(index)
            by_shard.setdefault(shard, []).append((position, place))
        records = [b""] * len(indices)
        with self._lock:
            for shard, wanted in by_shard.items():
                for (_, place), record in zip(wanted, self._read(shard, [p for p, _ in wanted]), strict=True):
                    records[place] = record
        return [self._parse(r, i) for r, i in zip(records, indices, strict=True)]

    def _parse(self, record: bytes, index: int) -> dict:
        try:
            fields = tf_example_pb2.Example.FromString(record).features.feature
        except message.DecodeError as e:
            raise DatasetError(
                f"{self.data_dir}, split {self.split!r}, record {index}: not a session record ({e})"
            ) from None
        out = {}
        for key, dtype, scalar in self._fields:
            if key not in fields:
                raise DatasetError(f"{self.data_dir}, split {self.split!r}, record {index}: no field {key!r}")
            values = fields[key].int64_list.value
            if not scalar:
                out[key] = np.fromiter(values, dtype, len(values))
            elif len(values) != 1:
                raise DatasetError(
                    f"{self.data_dir}, split {self.split!r}, record {index}: field {key!r} holds {len(values)} values, not 1"
                )
            else:
                out[key] = dtype(values[0])  # a Python scalar, as TFDS decodes it
        return out


# (field, dtype, scalar): what `SessionRecords` parses each field of FEATURES into.
_FIELD_TYPES = tuple(
    (key, spec.np_dtype, False)
    if isinstance(spec, tfds.features.Tensor)
    else (key, bool if spec is np.bool_ else int, True)
    for key, spec in FEATURES.items()
)


def open_source(data_dir: str, split: str, fields: Sequence[str] | None = None) -> SessionRecords:
    return SessionRecords(data_dir, split, fields)


def bit_positions(model_actions: Sequence[str], data_actions: Sequence[str], what: str) -> np.ndarray:
    missing = [a for a in model_actions if a not in data_actions]
    if missing:
        raise DatasetError(f"{what} {missing} are not in the dataset's vocabulary {list(data_actions)}")
    return np.array([data_actions.index(a) for a in model_actions], np.int64)


def _multi_hot(masks: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """[...] int64 bitmasks -> [..., A] int32 over the actions at `bits`."""
    return ((masks[..., None] >> bits) & 1).astype(np.int32)


def _concatenated(sessions: Sequence[Mapping[str, np.ndarray]], key: str) -> np.ndarray:
    """Field `key` of each session, concatenated after one zero: `[1 + total]`, in the sessions'
    dtype. Index it with `_windows`' positions + 1, and 0 where not valid (the zero padding reads)."""
    return np.concatenate([np.zeros(1, sessions[0][key].dtype), *(s[key] for s in sessions)])


def _windows(lengths: np.ndarray, first: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `width` consecutive items of ragged fields of lengths `lengths [n]`, row i starting
    at item `first[i]` of its session -> (index [n, width] into the fields' concatenation, valid)."""
    offsets = np.cumsum(lengths) - lengths  # [n]: each session's first item in the concatenation
    cols = np.arange(width)
    return offsets[:, None] + first[:, None] + cols, cols < (lengths - first)[:, None]


def recent_histories(sessions: Sequence[Mapping[str, np.ndarray]], s: int, bits: np.ndarray) -> dict[str, np.ndarray]:
    """Each session's S most recent history items (oldest first), padded at the end, actions as
    multi-hot: `[n, S]` fields (`history_actions [n, S, A]`)."""
    lengths = np.array([len(x["history_post_id"]) for x in sessions], np.int64)
    index, valid = _windows(lengths, np.maximum(lengths - s, 0), s)
    keys = ("history_post_id", "history_author_id", "history_product_surface", "history_actions")
    out = {key: _concatenated(sessions, key)[np.where(valid, index + 1, 0)] for key in keys}
    out["history_actions"] = _multi_hot(out["history_actions"], bits)
    out["history_valid"] = valid
    return out


def hash_prefix(ex: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Raw user and history IDs `[B, ...]` -> the model's user and history inputs."""
    hv = ex["history_valid"]
    return {
        "user_hashes": hash_ids(ex["user_id"], cfg.num_user_hashes, cfg.user_vocab_rows),
        "history_post_hashes": _hashed(ex["history_post_id"], hv, cfg.num_post_hashes, cfg.post_vocab_rows),
        "history_author_hashes": _hashed(ex["history_author_id"], hv, cfg.num_author_hashes, cfg.author_vocab_rows),
        "history_actions": ex["history_actions"] * hv[..., None],
        "history_product_surface": (ex["history_product_surface"] * hv).astype(np.int32),
    }


def _hashed(ids, valid, num_hashes, rows):
    return hash_ids(ids, num_hashes, rows) * valid[..., None].astype(np.int32)


def _hash_candidates(ex: Mapping[str, np.ndarray], cv: np.ndarray, pv: np.ndarray, cfg: ModelConfig) -> dict:
    """Raw candidate and positive IDs -> the model's candidate inputs and retrieval targets, zero
    where `cv` (candidates) and `pv` (positives) say not valid."""
    return {
        "candidate_post_hashes": _hashed(ex["candidate_post_id"], cv, cfg.num_post_hashes, cfg.post_vocab_rows),
        "candidate_author_hashes": _hashed(ex["candidate_author_id"], cv, cfg.num_author_hashes, cfg.author_vocab_rows),
        "candidate_product_surface": (ex["candidate_product_surface"] * cv).astype(np.int32),
        "positive_post_hashes": _hashed(ex["positive_post_id"], pv, cfg.num_post_hashes, cfg.post_vocab_rows),
        "positive_author_hashes": _hashed(ex["positive_author_id"], pv, cfg.num_author_hashes, cfg.author_vocab_rows),
        "positive_id": fingerprint(ex["positive_post_id"]) * pv,
        "positive_valid": pv,
        "candidate_author_fingerprint": fingerprint(ex["candidate_author_id"]) * cv,
    }


class SessionToExamples(grain.experimental.FlatMapTransform):
    """One session -> ceil(#candidates / C) examples, each `(session, first candidate)`: what
    `ExamplesToBatch` turns into arrays, a batch at a time."""

    max_fan_out = 1024

    def __init__(self, cfg: ModelConfig):
        self.c = cfg.num_candidates

    def flat_map(self, session: Mapping[str, np.ndarray]) -> list[tuple[Mapping[str, np.ndarray], int]]:
        return [(session, start) for start in range(0, len(session["candidate_post_id"]), self.c)]


class ExamplesToBatch:
    """A batch's examples `(session, first candidate)` -> raw-ID arrays with fixed shapes `[n, ...]`:
    the session's S most recent history items, C candidates from the first (padded at the end), and
    the session's first positive candidate in the session's first example. Vectorized over the
    batch: a field is one concatenation and one gather, whatever the number of sessions."""

    def __init__(self, cfg: ModelConfig, data_actions: Sequence[str], positive_actions: Sequence[str]):
        self.s, self.c = cfg.history_len, cfg.num_candidates
        self.bits = bit_positions(cfg.actions, data_actions, "the model's actions")
        positive_bits = bit_positions(positive_actions, data_actions, "positive_actions")
        self.positive_mask = np.int64(np.bitwise_or.reduce(np.int64(1) << positive_bits))

    def __call__(self, examples: Sequence[tuple[Mapping[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
        sessions = [session for session, _ in examples]
        starts = np.array([start for _, start in examples], np.int64)
        lengths = np.array([len(x["candidate_post_id"]) for x in sessions], np.int64)  # each >= 1
        index, valid = _windows(lengths, starts, self.c)
        out = {
            "session_id": np.array([x["session_id"] for x in sessions], np.int64),
            "candidate_offset": starts.astype(np.int32),
            "user_id": np.array([x["user_id"] for x in sessions], np.int64),
            **recent_histories(sessions, self.s, self.bits),
        }
        flat = {
            k: _concatenated(sessions, f"candidate_{k}") for k in ("post_id", "author_id", "product_surface", "actions")
        }
        rows = np.where(valid, index + 1, 0)
        for key in ("post_id", "author_id", "product_surface"):
            out[f"candidate_{key}"] = flat[key][rows]
        out["candidate_actions"] = _multi_hot(flat["actions"][rows], self.bits)
        out["candidate_valid"] = valid
        out["labeled"] = np.array([bool(x["labeled"]) for x in sessions])
        # The session's first positive candidate, in its first example only.
        masks = flat["actions"][1:]  # [total]
        hit = np.where((masks & self.positive_mask) != 0, np.arange(len(masks)), len(masks))
        # [n]: from each session's first item (its row's first index less its start); len(masks): none
        first_hit = np.minimum.reduceat(hit, index[:, 0] - starts)
        positive = (starts == 0) & out["labeled"] & (first_hit < len(masks))
        for key in ("post_id", "author_id"):
            out[f"positive_{key}"] = flat[key][np.where(positive, first_hit + 1, 0)]
        out["positive_valid"] = positive
        return out


class HashBatch(grain.transforms.Map):
    """A batch of raw-ID examples -> model inputs and targets; short batches padded to full size."""

    def __init__(self, cfg: ModelConfig, batch_size: int):
        self.cfg, self.batch_size = cfg, batch_size

    def map(self, ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg = self.cfg
        cv, pv = ex["candidate_valid"], ex["positive_valid"]
        out = {
            **hash_prefix(ex, cfg),
            **_hash_candidates(ex, cv, pv, cfg),
            "candidate_actions": ex["candidate_actions"],
            "labeled": ex["labeled"],
            "session_id": ex["session_id"],
            "candidate_offset": ex["candidate_offset"],
            "candidate_post_id": ex["candidate_post_id"],
            "positive_post_id": ex["positive_post_id"],
        }
        return pad_batch(out, self.batch_size)  # a short last batch (drop_remainder=False)


# A packable example's fields (`ExampleToPackable`): its [user, history] positions, its candidates,
# and the session's own values, one each; grain packs each group into its own length.
_PREFIX_FIELDS = ("prefix_post_id", "prefix_author_id", "prefix_product_surface", "prefix_actions")
_CANDIDATE_FIELDS = ("candidate_post_id", "candidate_author_id", "candidate_product_surface", "candidate_actions")
_SESSION_FIELDS = (
    "user_id", "labeled", "session_id", "candidate_offset", "positive_post_id", "positive_author_id", "positive_valid",
)  # fmt: skip


class ExampleToPackable(grain.transforms.Map):
    """An example `(session, first candidate)` -> its arrays for packing: `prefix_*` `[1 + n]`
    (position 0 the user's, holding no item; then the n <= S most recent history items, oldest
    first), `candidate_*` `[c <= C]`, and the session's values `[1]`, with the retrieval
    positive as `ExamplesToBatch` takes it (the session's first positive candidate, in its
    first example)."""

    def __init__(self, cfg: ModelConfig, data_actions: Sequence[str], positive_actions: Sequence[str]):
        self.s, self.c = cfg.history_len, cfg.num_candidates
        positive_bits = bit_positions(positive_actions, data_actions, "positive_actions")
        self.positive_mask = np.int64(np.bitwise_or.reduce(np.int64(1) << positive_bits))

    def map(self, example: tuple[Mapping[str, np.ndarray], int]) -> dict[str, np.ndarray]:
        session, start = example
        n = min(len(session["history_post_id"]), self.s)
        out = {}
        for name in ("post_id", "author_id", "product_surface", "actions"):
            history = np.asarray(session[f"history_{name}"])[len(session["history_post_id"]) - n :]
            out[f"prefix_{name}"] = np.concatenate([np.zeros(1, history.dtype), history])
            out[f"candidate_{name}"] = np.asarray(session[f"candidate_{name}"])[start : start + self.c]
        hits = np.flatnonzero(np.asarray(session["candidate_actions"]) & self.positive_mask)
        positive = start == 0 and bool(session["labeled"]) and hits.size > 0
        first = hits[0] if positive else 0
        values = {
            "user_id": session["user_id"],
            "labeled": bool(session["labeled"]),
            "session_id": session["session_id"],
            "candidate_offset": start,
            "positive_post_id": session["candidate_post_id"][first] if positive else 0,
            "positive_author_id": session["candidate_author_id"][first] if positive else 0,
            "positive_valid": positive,
        }
        for key, value in values.items():
            out[key] = np.asarray([value], np.bool_ if isinstance(value, bool) else np.int64)
        return out


def pack_lengths(data: DataConfig) -> dict[str, int]:
    """Each packable field's length in a packed row (grain's `length_struct`)."""
    return {
        **dict.fromkeys(_PREFIX_FIELDS, data.pack_prefix),
        **dict.fromkeys(_CANDIDATE_FIELDS, data.pack_candidates),
        **dict.fromkeys(_SESSION_FIELDS, data.pack_sessions),
    }


class HashPackedBatch(grain.transforms.Map):
    """A batch of packed rows (`ExampleToPackable`'s fields, packed by grain, with its segment ids
    and positions) -> the model's packed inputs and targets (`data.batch.PACKED_FIELDS`); short
    batches padded to full size."""

    def __init__(self, cfg: ModelConfig, data_actions: Sequence[str], batch_size: int):
        self.cfg, self.batch_size = cfg, batch_size
        self.bits = bit_positions(cfg.actions, data_actions, "the model's actions")

    def map(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg = self.cfg
        segment, position = rows["prefix_post_id_segment_ids"], rows["prefix_post_id_positions"]
        item = (segment > 0) & (position > 0)  # [B, P] a history item (position 0 is the session's user)
        cv = rows["candidate_post_id_segment_ids"] > 0  # [B, C]
        sv = rows["user_id_segment_ids"] > 0  # [B, G] a session
        pv = rows["positive_valid"] & sv
        out = {
            "user_hashes": _hashed(rows["user_id"], sv, cfg.num_user_hashes, cfg.user_vocab_rows),
            "history_post_hashes": _hashed(rows["prefix_post_id"], item, cfg.num_post_hashes, cfg.post_vocab_rows),
            "history_author_hashes": _hashed(
                rows["prefix_author_id"], item, cfg.num_author_hashes, cfg.author_vocab_rows
            ),
            "history_actions": _multi_hot(rows["prefix_actions"], self.bits) * item[..., None],
            "history_product_surface": (rows["prefix_product_surface"] * item).astype(np.int32),
            **_hash_candidates(rows, cv, pv, cfg),
            "candidate_actions": _multi_hot(rows["candidate_actions"], self.bits) * cv[..., None],
            "labeled": rows["labeled"] & sv,
            "prefix_segment": segment,
            "prefix_position": position,
            "candidate_segment": rows["candidate_post_id_segment_ids"],
            "candidate_position": rows["candidate_post_id_positions"],
            "session_id": rows["session_id"],
            "candidate_offset": rows["candidate_offset"].astype(np.int32),
            "candidate_post_id": rows["candidate_post_id"],
            "positive_post_id": rows["positive_post_id"],
        }
        return pad_batch(out, self.batch_size)


def batch_examples(
    examples: grain.IterDataset,
    cfg: ModelConfig,
    data: DataConfig,
    data_actions: Sequence[str],
    batch_size: int,
    *,
    packed: bool = False,
    drop_remainder: bool = True,
) -> grain.IterDataset:
    """A stream of examples `(session, first candidate)` (`SessionToExamples`) -> hashed batches of
    `batch_size` rows, a session a row or `packed` (`make_dataset`'s arguments)."""
    if not packed:
        to_batch = ExamplesToBatch(cfg, data_actions, data.positive_actions)
        it = examples.batch(batch_size, drop_remainder=drop_remainder, batch_fn=to_batch)
        return it.map(HashBatch(cfg, batch_size))
    if not data.packed:
        raise ValueError("packed=True needs data.pack_prefix, data.pack_candidates and data.pack_sessions")
    it = examples.map(ExampleToPackable(cfg, data_actions, data.positive_actions))
    # Open bins: twice a batch's rows; a packing round ends when an example fits none.
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct=pack_lengths(data), num_packing_bins=2 * batch_size, shuffle_bins=False
    )
    it = it.batch(batch_size, drop_remainder=drop_remainder)
    return it.map(HashPackedBatch(cfg, data_actions, batch_size))


def make_dataset(
    cfg: ModelConfig,
    data: DataConfig,
    split: str,
    *,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    batch_size: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    packed: bool = False,
) -> grain.IterDataset:
    """This process's stream of batches of `split`. Iterate it; `iter(...)` state is checkpointable.

    Args:
      cfg: the model's shapes and action vocabulary.
      data: where the dataset is, the global batch size, the shuffle seed, workers, positives.
      split: a split of the prepared dataset.
      shuffle: a new global order each epoch (from `data.seed`); False reads in stored order.
      num_epochs: None repeats forever.
      drop_remainder: False pads the last partial batch with empty rows instead of dropping it.
      batch_size: rows per batch of this process; default `data.batch_size / process_count`.
      process_index, process_count: this process's slice (default: JAX's).
      packed: several sessions a row, as `data.pack_*` say (`data.batch.PACKED_FIELDS`); the last
        partial batch is dropped or padded with empty rows as `drop_remainder` says.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if batch_size is None:
        if data.batch_size % process_count:
            raise ValueError(f"data.batch_size={data.batch_size} does not divide over {process_count} processes")
        batch_size = data.batch_size // process_count
    source = open_source(data.data_dir, split)
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=data.seed)  # a new global order each epoch
    ds = ds.repeat(num_epochs)
    ds = ds[process_index::process_count]  # disjoint, and together complete, each epoch
    actions = dataset_actions(data.data_dir)
    # A short read-ahead: grain's default (16 threads, 500 records) costs more in bookkeeping and
    # GIL contention than local ArrayRecord reads take (bench/pipeline.py).
    read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=64)
    examples = grain.experimental.FlatMapIterDataset(ds.to_iter_dataset(read), SessionToExamples(cfg))
    it = batch_examples(examples, cfg, data, actions, batch_size, packed=packed, drop_remainder=drop_remainder)
    if data.worker_count > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; ours are not an absl app
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.worker_count))
    return it


def global_batch(local: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh, rules: LogicalRules = DEFAULT_RULES) -> dict:
    """This process's batch -> global `jax.Array`s, rows sharded as the rules place `batch`
    (device fields only)."""
    sharding = logical_sharding(mesh, ("batch",), rules)
    return {k: jax.make_array_from_process_local_data(sharding, local[k]) for k in DEVICE_FIELDS if k in local}
