"""The grain pipeline: prepared sessions -> hashed, fixed-shape, per-process numpy batches.

    source (tfds.data_source) -> global shuffle per epoch -> repeat -> this process's 1/P
    -> session to examples of C candidates -> batch -> hash IDs -> [worker processes]

A session with more than C candidates becomes several examples (candidates never attend to
each other, so splitting them changes no score); none is dropped. `global_batch` turns a
process's batch into a sharded global `jax.Array` batch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from etils import epath

from phoenix_flax.batch import DEVICE_FIELDS, pad_batch
from phoenix_flax.config import ModelConfig
from phoenix_flax.data.config import DataConfig
from phoenix_flax.data.prepare import DATASET_NAME, STATISTICS_FILE, PhoenixSessions, dataset_dir  # noqa: F401
from phoenix_flax.errors import DatasetError
from phoenix_flax.hashing import fingerprint, hash_ids
from phoenix_flax.sharding import DEFAULT_RULES, LogicalRules, logical_sharding


def _prepared(data_dir: str):
    """The dataset's builder; DatasetError when `data_dir` holds no prepared dataset (TFDS would
    otherwise try to generate one there)."""
    if not epath.Path(dataset_dir(data_dir), "dataset_info.json").exists():
        raise DatasetError(f"no prepared dataset in {data_dir} (phoenix-prepare writes it to {dataset_dir(data_dir)})")
    return tfds.builder(DATASET_NAME, data_dir=data_dir)


def dataset_actions(data_dir: str) -> tuple[str, ...]:
    """The action vocabulary the dataset's bitmasks refer to."""
    return tuple(_prepared(data_dir).info.metadata["actions"])


def dataset_splits(data_dir: str) -> set[str]:
    return set(_prepared(data_dir).info.splits)


def dataset_statistics(data_dir: str) -> dict:
    """What phoenix-prepare measured of each split (`statistics.json`; {} when absent)."""
    path = epath.Path(dataset_dir(data_dir), STATISTICS_FILE)
    return json.loads(path.read_text()) if path.exists() else {}


def open_source(data_dir: str, split: str):
    splits = dataset_splits(data_dir)
    if split not in splits:
        raise DatasetError(f"the dataset in {data_dir} has no split {split!r} (it has {sorted(splits)})")
    return tfds.data_source(DATASET_NAME, data_dir=data_dir, split=split)


def bit_positions(model_actions: Sequence[str], data_actions: Sequence[str], what: str) -> np.ndarray:
    missing = [a for a in model_actions if a not in data_actions]
    if missing:
        raise DatasetError(f"{what} {missing} are not in the dataset's vocabulary {list(data_actions)}")
    return np.array([data_actions.index(a) for a in model_actions], np.int64)


def _multi_hot(masks: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """[...] int64 bitmasks -> [..., A] int32 over the actions at `bits`."""
    return ((masks[..., None] >> bits) & 1).astype(np.int32)


def recent_history(session: Mapping[str, np.ndarray], s: int, bits: np.ndarray) -> dict[str, np.ndarray]:
    """The S most recent history items (oldest first), padded at the end, actions as multi-hot."""
    n = min(len(session["history_post_id"]), s)
    out = {}
    for key in ("history_post_id", "history_author_id", "history_product_surface", "history_actions"):
        x = np.zeros(s, session[key].dtype)
        x[:n] = session[key][len(session[key]) - n :]
        out[key] = x
    out["history_actions"] = _multi_hot(out["history_actions"], bits)
    out["history_valid"] = np.arange(s) < n
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


class SessionToExamples(grain.experimental.FlatMapTransform):
    """One session -> ceil(#candidates / C) examples of raw IDs with fixed shapes."""

    max_fan_out = 1024

    def __init__(self, cfg: ModelConfig, data_actions: Sequence[str], positive_actions: Sequence[str]):
        self.s, self.c = cfg.history_len, cfg.num_candidates
        self.bits = bit_positions(cfg.actions, data_actions, "the model's actions")
        positive_bits = bit_positions(positive_actions, data_actions, "positive_actions")
        self.positive_mask = np.int64(np.bitwise_or.reduce(np.int64(1) << positive_bits))

    def flat_map(self, session: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        c = self.c
        history = recent_history(session, self.s, self.bits)

        labeled = bool(session["labeled"])
        cand_masks = session["candidate_actions"]
        hits = np.nonzero((cand_masks & self.positive_mask) != 0)[0] if labeled else []
        m = len(session["candidate_post_id"])
        examples = []
        for start in range(0, m, c):
            k = min(c, m - start)
            ex = {"session_id": np.int64(session["session_id"]), "candidate_offset": np.int32(start)}
            ex["user_id"] = np.int64(session["user_id"])
            ex.update(history)
            for key in ("candidate_post_id", "candidate_author_id", "candidate_product_surface"):
                x = np.zeros(c, session[key].dtype)
                x[:k] = session[key][start : start + k]
                ex[key] = x
            masks = np.zeros(c, np.int64)
            masks[:k] = cand_masks[start : start + k]
            ex["candidate_actions"] = _multi_hot(masks, self.bits)
            ex["candidate_valid"] = np.arange(c) < k
            ex["labeled"] = np.bool_(labeled)
            first = start == 0 and len(hits) > 0  # the session's positive, in its first example
            j = hits[0] if first else 0
            ex["positive_post_id"] = np.int64(session["candidate_post_id"][j] if first else 0)
            ex["positive_author_id"] = np.int64(session["candidate_author_id"][j] if first else 0)
            ex["positive_valid"] = np.bool_(first)
            examples.append(ex)
        return examples


class HashBatch(grain.transforms.Map):
    """A batch of raw-ID examples -> model inputs and targets; short batches padded to full size."""

    def __init__(self, cfg: ModelConfig, batch_size: int):
        self.cfg, self.batch_size = cfg, batch_size

    def map(self, ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg = self.cfg
        cv, pv = ex["candidate_valid"], ex["positive_valid"]
        out = {
            **hash_prefix(ex, cfg),
            "candidate_post_hashes": _hashed(ex["candidate_post_id"], cv, cfg.num_post_hashes, cfg.post_vocab_rows),
            "candidate_author_hashes": _hashed(
                ex["candidate_author_id"], cv, cfg.num_author_hashes, cfg.author_vocab_rows
            ),
            "candidate_product_surface": (ex["candidate_product_surface"] * cv).astype(np.int32),
            "candidate_actions": ex["candidate_actions"],
            "labeled": ex["labeled"],
            "positive_post_hashes": _hashed(ex["positive_post_id"], pv, cfg.num_post_hashes, cfg.post_vocab_rows),
            "positive_author_hashes": _hashed(
                ex["positive_author_id"], pv, cfg.num_author_hashes, cfg.author_vocab_rows
            ),
            "positive_id": fingerprint(ex["positive_post_id"]) * pv,
            "positive_valid": pv,
            "candidate_author_fingerprint": fingerprint(ex["candidate_author_id"]) * cv,
            "session_id": ex["session_id"],
            "candidate_offset": ex["candidate_offset"],
            "candidate_post_id": ex["candidate_post_id"],
            "positive_post_id": ex["positive_post_id"],
        }
        return pad_batch(out, self.batch_size)  # a short last batch (drop_remainder=False)


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
    to_examples = SessionToExamples(cfg, dataset_actions(data.data_dir), data.positive_actions)
    # A short read-ahead: grain's default (16 threads, 500 records) costs more in bookkeeping and
    # GIL contention than local ArrayRecord reads take (bench/pipeline.py).
    read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=64)
    it = grain.experimental.FlatMapIterDataset(ds.to_iter_dataset(read), to_examples)
    it = it.batch(batch_size, drop_remainder=drop_remainder)
    it = it.map(HashBatch(cfg, batch_size))
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
