"""The raw session format: JSON Lines or Parquet, one session per line or row.

```
{"user_id": 123,
 "history":    [{"post_id": 9, "author_id": 4, "product_surface": 1, "actions": ["favorite"]}, ...],
 "candidates": [{"post_id": 7, "author_id": 2, "product_surface": 0, "actions": ["dwell"]}, ...]}
```
IDs are int64; `history` is oldest first; `actions` name actions of the vocabulary (empty: shown,
no action). Candidate `actions` are labels and may be absent (inference), for all candidates of
a session or for none. A candidate's optional `in_network` (true or false; default true) says
whether its author is in the user's network (the feed scorer's out-of-network factor reads it).
`session_id` (int64) is optional and kept. Other fields are ignored.

Sessions are parsed into `Session`s whose actions are bitmasks over the vocabulary.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from phoenix_flax.errors import PhoenixError

if TYPE_CHECKING:
    import pyarrow as pa

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1
MAX_ACTIONS = 63  # actions are stored as int64 bitmasks


class SessionFormatError(PhoenixError, ValueError):
    """A record that does not follow the raw format, located by file, line and field."""

    def __init__(self, path: str, line: int, field: str | None, problem: str):
        self.path, self.line, self.field, self.problem = path, line, field, problem
        where = f"{path}:{line}" + (f": field '{field}'" if field else "")
        super().__init__(f"{where}: {problem}")


@dataclasses.dataclass
class Session:
    """One parsed session. Arrays are per item; `*_actions` are bitmasks over the vocabulary."""

    session_id: int
    user_id: int
    history_post_id: np.ndarray  # [n] int64
    history_author_id: np.ndarray
    history_product_surface: np.ndarray  # [n] int32
    history_actions: np.ndarray  # [n] int64
    candidate_post_id: np.ndarray  # [m] int64
    candidate_author_id: np.ndarray
    candidate_product_surface: np.ndarray
    candidate_actions: np.ndarray  # [m] int64, zeros when unlabeled
    labeled: bool
    candidate_in_network: np.ndarray | None = None  # [m] bool; None: all in network

    def in_network(self) -> np.ndarray:
        """`[m]` bool: whether each candidate is in the user's network."""
        if self.candidate_in_network is None:
            return np.ones(len(self.candidate_post_id), bool)
        return self.candidate_in_network


def _integers(column) -> np.ndarray | None:
    """An Arrow integer column without nulls -> int64 values; None otherwise (or beyond int64)."""
    import pyarrow as pa

    if not pa.types.is_integer(column.type) or column.null_count:
        return None
    if column.type == pa.uint64() and len(column) and column.to_numpy().max() > INT64_MAX:
        return None
    return column.to_numpy(zero_copy_only=False).astype(np.int64)


class RecordError(PhoenixError, ValueError):
    """A record received on its own (a server's request body), not read from a file: names the field."""

    def __init__(self, field: str | None, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"field '{field}': {problem}" if field else problem)


class _Invalid(Exception):
    def __init__(self, field: str | None, problem: str):
        self.field, self.problem = field, problem


def _int64(value, field: str) -> int:
    if type(value) is not int:  # bool is an int subclass: rejected too
        raise _Invalid(field, f"expected an integer: got {type(value).__name__} {value!r}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise _Invalid(field, f"out of the int64 range: {value}")
    return value


class SessionParser:
    """Validates raw records against an action vocabulary (and, where a model reads them, its
    product-surface vocabulary: `surface_vocab_size`)."""

    def __init__(self, actions: Sequence[str], require_candidates: bool = True, surface_vocab_size: int | None = None):
        self.require_candidates = require_candidates
        self.surface_limit = INT32_MAX + 1 if surface_vocab_size is None else surface_vocab_size
        if len(actions) > MAX_ACTIONS:
            raise ValueError(f"at most {MAX_ACTIONS} actions are supported, got {len(actions)}")
        self.actions = tuple(actions)
        self._bit = {name: 1 << i for i, name in enumerate(self.actions)}

    def _surface(self, value, field: str) -> int:
        if type(value) is not int:
            raise _Invalid(field, f"expected an integer: got {type(value).__name__} {value!r}")
        if not 0 <= value < self.surface_limit:
            raise _Invalid(field, f"out of range [0, {self.surface_limit - 1}] (the surface vocabulary): {value}")
        return value

    def _actions(self, value, field: str) -> int:
        if not isinstance(value, (list, tuple, np.ndarray)):
            raise _Invalid(field, f"expected a list of action names: got {type(value).__name__} {value!r}")
        mask = 0
        for j, name in enumerate(value):
            bit = self._bit.get(name) if isinstance(name, str) else None
            if bit is None:
                raise _Invalid(f"{field}[{j}]", f"unknown action: {name!r} (known: {', '.join(self.actions)})")
            mask |= bit
        return mask

    def _items(self, record: dict, key: str, labels_optional: bool):
        items = record.get(key)
        if items is None:
            raise _Invalid(key, "missing")
        if not isinstance(items, (list, tuple, np.ndarray)):
            raise _Invalid(key, f"expected a list: got {type(items).__name__}")
        cols = ([], [], [], [])
        network = []  # in_network flags
        labeled = None
        for i, item in enumerate(items):
            f = f"{key}[{i}]"
            if not isinstance(item, dict):
                raise _Invalid(f, f"expected an object: got {type(item).__name__}")
            for name in ("post_id", "author_id", "product_surface"):
                if item.get(name) is None:
                    raise _Invalid(f"{f}.{name}", "missing")
            cols[0].append(_int64(item["post_id"], f"{f}.post_id"))
            cols[1].append(_int64(item["author_id"], f"{f}.author_id"))
            cols[2].append(self._surface(item["product_surface"], f"{f}.product_surface"))
            has = item.get("actions") is not None
            if not has and not labels_optional:
                raise _Invalid(f"{f}.actions", "missing")
            if labeled is not None and has != labeled:
                raise _Invalid(f"{f}.actions", "present for some candidates of the session and absent for others")
            labeled = has
            cols[3].append(self._actions(item["actions"], f"{f}.actions") if has else 0)
            in_network = item.get("in_network")
            if in_network is not None and type(in_network) is not bool:
                raise _Invalid(f"{f}.in_network", f"expected true or false: got {in_network!r}")
            network.append(in_network is not False)
        arrays = (
            np.array(cols[0], np.int64),
            np.array(cols[1], np.int64),
            np.array(cols[2], np.int32),
            np.array(cols[3], np.int64),
        )
        return arrays, bool(labeled), np.array(network, bool)

    def parse(self, record, default_session_id: int) -> Session:
        """A decoded record -> Session; raises `_Invalid(field, problem)`."""
        if not isinstance(record, dict):
            raise _Invalid(None, f"expected a JSON object: got {type(record).__name__}")
        if record.get("user_id") is None:
            raise _Invalid("user_id", "missing")
        user_id = _int64(record["user_id"], "user_id")
        sid = record.get("session_id")
        session_id = default_session_id if sid is None else _int64(sid, "session_id")
        history, _, _ = self._items(record, "history", labels_optional=False)
        if not self.require_candidates and record.get("candidates") is None:
            record = {**record, "candidates": []}
        candidates, labeled, in_network = self._items(record, "candidates", labels_optional=True)
        if self.require_candidates and len(candidates[0]) == 0:
            raise _Invalid("candidates", "empty: a session shows at least one candidate")
        return Session(session_id, user_id, *history, *candidates, labeled, None if in_network.all() else in_network)

    def parse_record(self, record) -> Session:
        """A decoded record on its own (a request): as `parse`, raising RecordError."""
        try:
            return self.parse(record, default_session_id=0)
        except _Invalid as e:
            raise RecordError(e.field, e.problem) from None

    def parse_columns(self, batch: pa.RecordBatch, first_session_id: int) -> list[Session] | None:
        """A Parquet record batch's sessions, all checked and converted at once, as `parse` would
        return them; None when any record needs `parse` (a null or missing field, a column of
        another type, an unknown action, a surface out of range, ...), which then names it."""
        import pyarrow as pa

        names = batch.schema.names
        if "user_id" not in names or "history" not in names or "candidates" not in names:
            return None
        user_id = _integers(batch.column("user_id"))
        history = self._item_columns(batch.column("history"), labels_optional=False)
        candidates = self._item_columns(batch.column("candidates"), labels_optional=True)
        if user_id is None or history is None or candidates is None:
            return None
        default_ids = first_session_id + np.arange(batch.num_rows, dtype=np.int64)
        session_id = default_ids
        if "session_id" in names and not pa.types.is_null(batch.schema.field("session_id").type):
            column = batch.column("session_id")
            given = _integers(column.fill_null(0))
            if given is None:
                return None
            session_id = np.where(column.is_null().to_numpy(zero_copy_only=False), default_ids, given)
        h_bounds, h_cols, _, _ = history
        c_bounds, c_cols, labeled, in_network = candidates
        c_lengths = np.diff(c_bounds)
        if self.require_candidates and not c_lengths.all():
            return None
        sessions = []
        for i in range(batch.num_rows):
            h, c = slice(h_bounds[i], h_bounds[i + 1]), slice(c_bounds[i], c_bounds[i + 1])
            network = in_network[c]
            sessions.append(
                Session(
                    int(session_id[i]),
                    int(user_id[i]),
                    *(col[h] for col in h_cols),
                    *(col[c] for col in c_cols),
                    bool(labeled[i]),
                    None if network.all() else network,
                )
            )
        return sessions

    def _item_columns(self, column, labels_optional: bool):
        """A `list<struct>` column of items -> (per-session bounds `[n + 1]`, (post, author,
        surface, action masks) `[items]`, per-session labeled `[n]`, in_network `[items]`), or None
        where a record needs `parse`."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)) or column.null_count:
            return None
        items = column.flatten()  # this slice's items
        if not pa.types.is_struct(items.type) or items.null_count:
            return None
        fields = dict(zip([f.name for f in items.type], items.flatten(), strict=True))
        if any(name not in fields for name in ("post_id", "author_id", "product_surface", "actions")):
            return None
        post, author, surface = (_integers(fields[n]) for n in ("post_id", "author_id", "product_surface"))
        if post is None or author is None or surface is None:
            return None
        if len(surface) and (surface.min() < 0 or surface.max() >= self.surface_limit):
            return None
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        actions = fields["actions"]
        if not (pa.types.is_list(actions.type) or pa.types.is_large_list(actions.type)) and not pa.types.is_null(
            actions.type
        ):
            return None
        has = ~actions.is_null().to_numpy(zero_copy_only=False)  # [items]
        masks = np.zeros(len(has), np.int64)
        labeled = np.zeros(len(lengths), bool)
        if not pa.types.is_null(actions.type):
            names = actions.flatten()
            if not (pa.types.is_string(names.type) or pa.types.is_large_string(names.type)):
                return None
            index = pc.index_in(names, value_set=pa.array(self.actions, names.type))
            if index.null_count:  # an unknown (or null) name
                return None
            counts = pc.list_value_length(actions).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
            bits = np.left_shift(np.int64(1), index.to_numpy(zero_copy_only=False).astype(np.int64))
            np.bitwise_or.at(masks, np.repeat(np.arange(len(has)), counts), bits)
        if not labels_optional and not has.all():
            return None
        if len(lengths):
            present = np.add.reduceat(np.append(has, False).astype(np.int64), bounds[:-1])  # [n]; per session
            present[lengths == 0] = 0
            if np.any((present != 0) & (present != lengths)):  # labels for some candidates only
                return None
            labeled = present > 0
        in_network = np.ones(len(has), bool)
        if "in_network" in fields:
            flags = fields["in_network"]
            if pa.types.is_boolean(flags.type):
                in_network = flags.fill_null(True).to_numpy(zero_copy_only=False)
            elif not pa.types.is_null(flags.type):
                return None
        return bounds, (post, author, surface.astype(np.int32), masks), labeled, in_network


class SkipReport:
    """Counts of records skipped with `--skip-invalid`, by reason, with the first example of each."""

    def __init__(self):
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, str] = {}

    def add(self, error: SessionFormatError) -> None:
        # Group by field with list indices dropped ('history[].post_id') and the problem's gist.
        field = re.sub(r"\[\d+\]", "[]", error.field) if error.field else "record"
        reason = f"{field}: {error.problem.split(':')[0]}"
        self.counts[reason] += 1
        self.examples.setdefault(reason, str(error))

    def merge(self, other: SkipReport) -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            self.examples.setdefault(reason, other.examples[reason])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no invalid records"
        lines = [f"skipped {self.total} invalid record(s):"]
        for reason, n in self.counts.most_common():
            lines.append(f"  {n} x {reason} (first: {self.examples[reason]})")
        return "\n".join(lines)


class InputFileError(PhoenixError, FileNotFoundError):
    """An input pattern that matches no file."""


def expand_paths(patterns: Sequence[str]) -> list[str]:
    """Globs -> sorted, de-duplicated file list; a pattern matching nothing is an error."""
    paths: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise InputFileError(f"no input file matches {pattern!r}")
        paths.extend(m for m in matches if m not in paths)
    return paths


def _open_binary(path: str) -> BinaryIO:
    return open(path, "rb")  # the caller closes it


def _parquet_batches(path: str, opener: Callable[[str], BinaryIO] | None = None) -> Iterator[pa.RecordBatch]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # Page checksums (which phoenix-import and phoenix-synth write) catch altered bytes.
        source = path if opener is None else opener(path)
        yield from pq.ParquetFile(source, page_checksum_verification=True).iter_batches(batch_size=4096)
    except (pa.ArrowException, OSError) as e:
        raise SessionFormatError(path, 1, None, f"not a readable Parquet file: {e}") from None


def _records(
    path: str, opener: Callable[[str], BinaryIO] = _open_binary
) -> Iterator[tuple[int, object, SessionFormatError | None]]:
    """(line number, decoded record, decoding error) of a JSON Lines or Parquet file; `opener`
    opens it (a Beam filesystem's, for remote paths)."""
    if path.endswith(".parquet"):
        line = 0
        for batch in _parquet_batches(path, opener):
            for record in batch.to_pylist():
                line += 1
                yield line, record, None
        return
    with opener(path) as f:  # decoded line by line: a bad byte spoils its line, not the file
        for line, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problem = f"not UTF-8: byte {raw[e.start]:#04x} at column {e.start + 1}"
                yield line, None, SessionFormatError(path, line, None, problem)
                continue
            if not text.strip():
                continue
            try:
                yield line, json.loads(text), None
            except json.JSONDecodeError as e:
                yield line, None, SessionFormatError(path, line, None, f"not valid JSON: {e.msg}")


def default_session_id(file_index: int, line: int) -> int:
    """The ID of a session given without one: from where it was read (the file's place among the
    inputs and its line), so that it is the same whether the files are read in one process or
    one a task (the Beam pipeline)."""
    return (file_index << 32) + line


def read_sessions(
    paths: Sequence[str],
    actions: Sequence[str],
    *,
    skip_invalid: bool = False,
    report: SkipReport | None = None,
    require_candidates: bool = True,
    surface_vocab_size: int | None = None,
    first_file_index: int = 0,
    opener: Callable[[str], BinaryIO] = _open_binary,
) -> Iterator[tuple[str, Session]]:
    """Streams `(key, Session)` from raw files, in file and line order.

    `key` ('<file index>:<line>') is unique and stable for the same inputs (`first_file_index`:
    the first path's place among all the inputs, where they are read one a task; `opener`: a
    Beam filesystem's, for remote paths). A session
    without `session_id` gets `default_session_id`. A bad record raises SessionFormatError, or
    with `skip_invalid` is counted in `report` and skipped. Without `require_candidates`
    (retrieval input) `candidates` may be absent or empty.
    """
    parser = SessionParser(actions, require_candidates, surface_vocab_size)
    report = report if report is not None else SkipReport()

    def checked(path, file_index, records):
        for line, record, error in records:
            if error is None:
                try:
                    session = parser.parse(record, default_session_id=default_session_id(file_index, line))
                except _Invalid as e:
                    error = SessionFormatError(path, line, e.field, e.problem)
            if error is not None:
                if not skip_invalid:
                    raise error
                report.add(error)
                continue
            yield line, session

    for file_index, path in enumerate(paths, start=first_file_index):
        if not path.endswith(".parquet"):
            for line, session in checked(path, file_index, _records(path, opener)):
                yield f"{file_index}:{line}", session
            continue
        line = 0
        for batch in _parquet_batches(path, opener):
            sessions = parser.parse_columns(batch, first_session_id=default_session_id(file_index, line + 1))
            if sessions is None:  # some record needs the per-record parser, which names its problem
                records = ((line + i, record, None) for i, record in enumerate(batch.to_pylist(), start=1))
                for record_line, session in checked(path, file_index, records):
                    yield f"{file_index}:{record_line}", session
            else:
                for i, session in enumerate(sessions, start=1):
                    yield f"{file_index}:{line + i}", session
            line += batch.num_rows


def items_column(
    post_ids: np.ndarray,
    author_ids: np.ndarray,
    surfaces: np.ndarray,
    masks: np.ndarray,
    lengths: np.ndarray,
    actions: Sequence[str],
):
    """Items of many sessions, flat `[n]` arrays with per-session `lengths`, -> the raw format's
    Arrow column: a list per session of {post_id, author_id, product_surface, actions}, with
    `actions` the names of each bitmask's set bits."""
    import pyarrow as pa

    masks = np.asarray(masks, np.int64)
    bits = (masks[:, None] >> np.arange(len(actions))) & 1
    _, action_idx = np.nonzero(bits)
    action_offsets = np.concatenate([[0], np.cumsum(bits.sum(1))])
    # Plain strings: Parquet dictionary-encodes them on disk anyway, and nested dictionary columns
    # written in several row groups cannot be read back in batches.
    names = pa.array(list(actions), pa.string()).take(pa.array(action_idx.astype(np.int64)))
    struct = pa.StructArray.from_arrays(
        [
            pa.array(np.asarray(post_ids, np.int64)),
            pa.array(np.asarray(author_ids, np.int64)),
            pa.array(np.asarray(surfaces, np.int64)),
            pa.ListArray.from_arrays(pa.array(action_offsets.astype(np.int32)), names),
        ],
        names=["post_id", "author_id", "product_surface", "actions"],
    )
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)  # callers write < 2^31 items at once
    return pa.ListArray.from_arrays(pa.array(offsets), struct)


def read_corpus(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A corpus of posts, JSON Lines of {"post_id", "author_id", ...} -> (post_ids, author_ids) int64.

    A bad line raises SessionFormatError naming the file, line and field.
    """
    post_ids, author_ids = [], []
    for line, record, error in _records(path):
        if error is not None:
            raise error
        try:
            if not isinstance(record, dict):
                raise _Invalid(None, f"expected a JSON object: got {type(record).__name__}")
            for name in ("post_id", "author_id"):
                if record.get(name) is None:
                    raise _Invalid(name, "missing")
            post_ids.append(_int64(record["post_id"], "post_id"))
            author_ids.append(_int64(record["author_id"], "author_id"))
        except _Invalid as e:
            raise SessionFormatError(path, line, e.field, e.problem) from None
    return np.array(post_ids, np.int64), np.array(author_ids, np.int64)
