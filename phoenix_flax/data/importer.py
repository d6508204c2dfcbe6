"""Interaction logs (one event per row: CSV, TSV or Parquet) -> the raw session format.

An event is a user, an item (a post), a time and what the user did. Columns are named by an
`ImportSpec`; labels come from an action-name column, from rules over a value column
(`favorite:rating>=4`), or from rules that hold for every event (`click:*`), and optionally
from implications (`favorite,reply => click,dwell`: a user who liked a post clicked it, logged or
not). Events of one user on one item are merged: their actions united, at the first one's time.

Each user's events, in time order, become sessions: a session's candidates are up to
`candidates_per_session` consecutive events of one split, labeled with their actions, and its
history the user's events before them (of any split): the last `max_history` in training
sessions, all of them in validation and test (so evaluation can leave out every item seen). Splits are per event:
`leave-last-out` puts each user's last event in test and the one before in validation (users with
at least 3 events; with 2, the last goes to test), the sequential-recommendation protocol;
`time` cuts globally at `validation_from` and `test_from`.

IDs: integer values are kept; other strings are hashed to int64 (BLAKE2b), the same on every
import. Without an author column every item's author is 0; without a surface column, surface 0.
Bad rows raise `SessionFormatError` naming file, line (Parquet: row) and column, or are counted
and skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import numpy as np

from phoenix_flax.data.hashing import pair_ids
from phoenix_flax.data.raw import INT64_MAX, INT64_MIN, SessionFormatError, SkipReport, items_column
from phoenix_flax.errors import PhoenixError
from phoenix_flax.files import replaced

_OPS: dict[str, Callable] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}
_RULE = re.compile(r"^\s*(\w+)\s*:\s*(?:(\*)|(\w[\w:.]*?)\s*(>=|<=|==|!=|>|<)\s*(-?[\d.]+(?:e-?\d+)?))\s*$")
SESSIONS_PER_WRITE = 20_000  # sessions built and written at once: bounds memory on large logs


class ImportSpecError(PhoenixError, ValueError):
    """A rule, implication or column mapping that cannot work."""


@dataclasses.dataclass(frozen=True)
class ActionRule:
    """`action:*` (every event) or `action:column OP number`, OP one of >= <= == != > <."""

    action: str
    column: str | None = None
    op: str | None = None
    threshold: float = 0.0

    @classmethod
    def parse(cls, text: str) -> ActionRule:
        m = _RULE.match(text)
        if not m:
            raise ImportSpecError(f"rule {text!r}: expected action:* or action:column>=number (ops: {' '.join(_OPS)})")
        action, star, column, op, number = m.groups()
        return cls(action) if star else cls(action, column, op, float(number))

    def holds(self, values: dict[str, np.ndarray], n: int) -> np.ndarray:
        if self.column is None:
            return np.ones(n, bool)
        return _OPS[self.op](values[self.column], self.threshold)


@dataclasses.dataclass(frozen=True)
class Implication:
    """`a,b => c,d`: an event with any of a, b also has c and d."""

    given: tuple[str, ...]
    implied: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Implication:
        given, arrow, implied = text.partition("=>")
        names = lambda part: tuple(x.strip() for x in part.split(",") if x.strip())  # noqa: E731
        if not arrow or not names(given) or not names(implied):
            raise ImportSpecError(f"implication {text!r}: expected action,action => action,action")
        return cls(names(given), names(implied))


@dataclasses.dataclass(frozen=True)
class ImportSpec:
    """Which columns mean what, how labels are made, and how events are split into sessions."""

    user: str
    item: str
    timestamp: str
    actions: tuple[str, ...]  # the vocabulary
    author: str | None = None
    surface: str | None = None
    action: str | None = None  # a column of action names
    rules: tuple[ActionRule, ...] = ()
    implications: tuple[Implication, ...] = ()
    split: Literal["leave-last-out", "time"] = "leave-last-out"
    validation_from: float | None = None  # time split: events at or after go to validation...
    test_from: float | None = None  # ... and at or after this, to test
    max_history: int = 50
    candidates_per_session: int = 1

    def __post_init__(self):
        problems = []
        known = set(self.actions)
        named = [r.action for r in self.rules] + [a for i in self.implications for a in i.given + i.implied]
        unknown = sorted(set(named) - known)
        if unknown:
            problems.append(f"actions {unknown} are not in the vocabulary ({', '.join(self.actions)})")
        if not self.rules and self.action is None:
            problems.append("no labels: give an action column or at least one rule (e.g. click:*)")
        if self.split == "time":
            if self.validation_from is None or self.test_from is None:
                problems.append("the time split needs validation_from and test_from")
            elif self.validation_from > self.test_from:
                problems.append(f"validation_from {self.validation_from} is after test_from {self.test_from}")
        if self.max_history < 1 or self.candidates_per_session < 1:
            problems.append("max_history and candidates_per_session must be at least 1")
        if problems:
            raise ImportSpecError("; ".join(problems))

    @property
    def value_columns(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.column for r in self.rules if r.column is not None))

    @property
    def columns(self) -> tuple[str, ...]:
        named = (self.user, self.item, self.timestamp, self.author, self.surface, self.action)
        return tuple(dict.fromkeys(c for c in (*named, *self.value_columns) if c is not None))


@dataclasses.dataclass
class Events:
    """Parsed events, `[n]` each."""

    user: np.ndarray  # int64
    item: np.ndarray
    author: np.ndarray
    surface: np.ndarray  # int64
    time: np.ndarray  # float64 seconds (or the log's own unit)
    actions: np.ndarray  # int64 bitmasks over the vocabulary

    def __len__(self) -> int:
        return len(self.user)

    @classmethod
    def concatenate(cls, parts: Sequence[Events]) -> Events:
        fields = [f.name for f in dataclasses.fields(cls)]
        if not parts:
            return cls(*(np.zeros(0, np.float64 if f == "time" else np.int64) for f in fields))
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))

    def take(self, idx: np.ndarray) -> Events:
        return Events(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))


# --- reading ------------------------------------------------------------------------------------


def _batches(
    path: str,
    columns: Sequence[str],
    fmt: str,
    names: Sequence[str] | None = None,
    skip_rows: int = 0,
    stream=None,
) -> Iterator[tuple[np.ndarray, object, list[SessionFormatError]]]:
    """(each row's line number, pyarrow RecordBatch of `columns` as read, the rows of too few or
    too many fields left out up to the batch's end) for each block; a last batch of None may
    carry rows left out after the others. CSV and TSV: `names` name the columns of a file without
    a header; `skip_rows` lines are skipped first; values are read as bytes (CSV: through latin-1).
    `stream`: the file already opened (a Beam filesystem's), read in place of `path`."""
    source = path if stream is None else stream
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if fmt == "parquet":
        try:
            f = pq.ParquetFile(source, page_checksum_verification=True)
        except (pa.ArrowInvalid, OSError) as e:
            raise SessionFormatError(path, 1, None, f"not a readable Parquet file: {e}") from None
        missing = [c for c in columns if c not in f.schema_arrow.names]
        if missing:
            raise SessionFormatError(path, 1, None, f"no column {missing} (columns: {', '.join(f.schema_arrow.names)})")
        row = 1
        for batch in f.iter_batches(batch_size=1 << 16, columns=list(columns)):
            yield np.arange(row, row + batch.num_rows), batch, []
            row += batch.num_rows
        return
    delimiter = "\t" if fmt == "tsv" else ","
    lines = _CsvLines(path, 1 + skip_rows + (0 if names else 1))
    try:
        reader = pacsv.open_csv(
            source,
            # Serial: Arrow then knows the line of a row with the wrong number of fields. Through
            # latin-1, which decodes any byte: a row of bytes that are not UTF-8 text then reaches
            # `left_out` too (Arrow fails to hand it over otherwise), and `_as_text` gets the bytes back.
            read_options=pacsv.ReadOptions(
                block_size=1 << 22,
                column_names=list(names) if names else None,
                skip_rows=skip_rows,
                use_threads=False,
                encoding="latin-1",
            ),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=lines.left_out),
            # Everything as bytes: a column's type is then the same in every block, and bad values
            # (text that is not UTF-8 included) are found and named at their line here rather than
            # by Arrow's inference.
            convert_options=pacsv.ConvertOptions(
                include_columns=list(columns), column_types=dict.fromkeys(columns, pa.binary())
            ),
        )
    except (pa.ArrowInvalid, KeyError) as e:
        raise SessionFormatError(path, 1, None, f"cannot read the header or the columns {list(columns)}: {e}") from None
    read = 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            if lines.errors:
                yield np.zeros(0, np.int64), None, lines.errors_until(None)
            return
        except pa.ArrowInvalid as e:
            line = int(lines.of(np.array([read]))[0])
            raise SessionFormatError(path, line, None, f"unreadable CSV near here: {e}") from None
        line = lines.of(np.arange(read, read + batch.num_rows))
        yield line, batch, lines.errors_until(int(line[-1]) if len(line) else None)
        read += batch.num_rows


class _CsvLines:
    """The line numbers of a CSV file's rows, given the lines Arrow's reader left out (rows with
    the wrong number of fields, reported to `left_out`). Quoted newlines inside values would
    shift them."""

    def __init__(self, path: str, first_line: int):
        self.path, self.first_line = path, first_line
        self.skipped: list[int] = []  # line numbers, ascending
        self.errors: list[SessionFormatError] = []  # those not yet handed out

    def left_out(self, row) -> str:
        self.skipped.append(row.number)
        text = row.text.encode("latin-1").decode("utf-8", "replace")
        problem = f"{row.actual_columns} fields where the header has {row.expected_columns}: {text!r}"
        self.errors.append(SessionFormatError(self.path, row.number, None, problem))
        return "skip"

    def errors_until(self, line: int | None) -> list[SessionFormatError]:
        """The errors at lines up to `line` (None: all), handed out once."""
        out = [e for e in self.errors if line is None or e.line <= line]
        self.errors = self.errors[len(out) :]
        return out

    def of(self, rows: np.ndarray) -> np.ndarray:
        """The line numbers of rows (0-based, counting only the rows read)."""
        skipped = np.asarray(self.skipped, np.int64)
        rows_before_skipped = skipped - self.first_line - np.arange(len(skipped))
        return self.first_line + rows + np.searchsorted(rows_before_skipped, rows, side="right")


def _hashed_ids(text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (int64 IDs, ok mask): integers as they are, anything else hashed (BLAKE2b, 63
    bits); integers beyond int64 are not ok."""
    uniq, inverse = np.unique(text, return_inverse=True)
    out = np.zeros(len(uniq), np.int64)
    ok = np.ones(len(uniq), bool)
    for i, s in enumerate(uniq):
        try:
            value = int(s)
        except ValueError:
            out[i] = int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") >> 1
            continue
        if INT64_MIN <= value <= INT64_MAX:
            out[i] = value
        else:
            ok[i] = False
    return out[inverse], ok[inverse]


def _float_values(text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (float64 values, ok mask); '' and non-numbers are not ok."""
    uniq, inverse = np.unique(text, return_inverse=True)
    vals = np.full(len(uniq), np.nan)
    for i, s in enumerate(uniq):
        try:
            vals[i] = float(s)
        except ValueError:
            continue
    out = vals[inverse]
    return out, np.isfinite(out)


def _times(text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Numbers, or ISO 8601 date-times (as seconds since the epoch)."""
    values, ok = _float_values(text)
    if not ok.all():
        for i in np.nonzero(~ok)[0]:
            try:
                values[i] = np.datetime64(text[i], "ms").astype(np.int64) / 1000.0
                ok[i] = True
            except ValueError:
                pass
    return values, ok


def _as_text(column, latin1: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A pyarrow column -> (numpy str array, present mask, UTF-8 mask: False where the bytes read
    are not UTF-8 text). `latin1`: a CSV column read through latin-1 (`_batches`), whose original
    bytes are recovered here and checked."""
    import pyarrow as pa
    import pyarrow.compute as pc

    present = ~np.asarray(column.is_null().to_numpy(zero_copy_only=False), bool)
    utf8 = np.ones(len(column), bool)
    column = pc.cast(column, pa.string())
    if latin1:
        ascii_only = np.asarray(pc.string_is_ascii(column).fill_null(True).to_numpy(zero_copy_only=False), bool)
        if not ascii_only.all():  # rare: the rows with other bytes, one by one
            values = column.to_pylist()
            for i in np.nonzero(~ascii_only)[0]:
                try:
                    values[i] = values[i].encode("latin-1").decode("utf-8")
                except UnicodeDecodeError:
                    values[i], utf8[i] = None, False
            column = pa.array(values, pa.string())
    text = column.fill_null("").to_numpy(zero_copy_only=False).astype(str)
    present &= utf8 & (np.char.str_len(text) > 0)
    return text, present, utf8


def read_events(
    paths: Sequence[str],
    spec: ImportSpec,
    *,
    fmt: str | None = None,
    skip_invalid: bool = False,
    report: SkipReport | None = None,
    progress: Callable[[int], None] | None = None,
    names: Sequence[str] | None = None,
    skip_rows: int = 0,
) -> Events:
    """The events of `paths`, in file and row order. A bad row raises SessionFormatError naming
    the file, line and column; with `skip_invalid` it is counted in `report` and left out. `names`
    and `skip_rows`: see `_batches`."""
    report = report if report is not None else SkipReport()
    parts = []
    for path in paths:
        for events, _, errors in file_events(path, spec, fmt or format_of(path), names, skip_rows):
            _bad_rows(errors, skip_invalid, report)
            parts.append(events)
            if progress:
                progress(len(events) + len(errors))
    return Events.concatenate(parts)


def file_events(
    path: str,
    spec: ImportSpec,
    fmt: str,
    names: Sequence[str] | None = None,
    skip_rows: int = 0,
    stream=None,
) -> Iterator[tuple[Events, np.ndarray, list[SessionFormatError]]]:
    """Per block of the file: (its valid events, their line numbers, its bad rows). The reading
    that `read_events` and the Beam pipeline (a file a task) share."""
    bit = {a: np.int64(1) << np.int64(i) for i, a in enumerate(spec.actions)}
    for line, batch, left_out in _batches(path, spec.columns, fmt, names, skip_rows, stream):
        if batch is None:
            yield Events.concatenate([]), np.zeros(0, np.int64), left_out
            continue
        n = batch.num_rows
        bad: dict[str, tuple[np.ndarray, Callable[[int], str]]] = {}  # column -> (bad mask, problem)
        text = {}
        for name in spec.columns:
            text[name], present, utf8 = _as_text(batch.column(name), latin1=fmt != "parquet")
            bad[name] = (~present, lambda i, utf8=utf8: "missing" if utf8[i] else "not UTF-8 text")
        ids = {}
        for name in (spec.user, spec.item, spec.author):
            if name is not None:
                ids[name], ok = _hashed_ids(np.where(bad[name][0], "0", text[name]))
                _flag(bad, name, ~ok, text[name], f"an integer ID beyond int64 ({INT64_MIN}..{INT64_MAX})")
        time, ok = _times(text[spec.timestamp])
        _flag(bad, spec.timestamp, ~ok, text[spec.timestamp], "not a number or an ISO date-time")
        surface = np.zeros(n, np.int64)
        if spec.surface is not None:
            values, ok = _float_values(text[spec.surface])
            ok &= (values >= 0) & (values == np.round(values)) & (values < 2**31)
            _flag(bad, spec.surface, ~ok, text[spec.surface], "not a product surface (an integer >= 0)")
            surface = np.where(ok, values, 0).astype(np.int64)
        values = {}
        for name in spec.value_columns:
            values[name], ok = _float_values(text[name])
            _flag(bad, name, ~ok, text[name], "not a number")
        masks = np.zeros(n, np.int64)
        for rule in spec.rules:
            masks |= np.where(rule.holds(values, n), bit[rule.action], 0)
        if spec.action is not None:
            action_names = text[spec.action]
            known = np.isin(action_names, list(spec.actions))
            _flag(
                bad,
                spec.action,
                ~known,
                action_names,
                f"not an action of the vocabulary ({', '.join(spec.actions)})",
            )
            masks |= np.array([bit.get(a, 0) for a in action_names.tolist()], np.int64).reshape(n)
        invalid, errors = np.zeros(n, bool), list(left_out)
        for name, (mask, problem) in bad.items():
            errors += [
                SessionFormatError(path, int(line[i]), name, problem(int(i))) for i in np.nonzero(mask & ~invalid)[0]
            ]
            invalid |= mask
        keep = np.nonzero(~invalid)[0]
        author = ids[spec.author] if spec.author is not None else np.zeros(n, np.int64)
        yield Events(ids[spec.user], ids[spec.item], author, surface, time, masks).take(keep), line[keep], errors


def _bad_rows(errors: list[SessionFormatError], skip_invalid: bool, report: SkipReport) -> None:
    """Raises the first by line, or with `skip_invalid` counts them all."""
    if errors and not skip_invalid:
        raise min(errors, key=lambda e: e.line)
    for error in errors:
        report.add(error)


def _flag(bad: dict, name: str, mask: np.ndarray, text: np.ndarray, what: str) -> None:
    """Marks rows of column `name` bad (where present but unusable) with a problem naming the value."""
    missing, missing_problem = bad[name]
    wrong = mask & ~missing

    def problem(i: int) -> str:
        return missing_problem(i) if missing[i] else f"{what}: {str(text[i])!r}"

    bad[name] = (missing | wrong, problem)


# `.data`: MovieLens' u.data; `.inter`: RecBole's atomic interaction files.
FORMAT_OF_EXTENSION = {
    ".parquet": "parquet",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".data": "tsv",
    ".inter": "tsv",
    ".csv": "csv",
}


def format_of(path: str) -> str:
    """A log file's format (csv, tsv or parquet) from its name, or ImportSpecError."""
    lower = path.lower()
    for ext, fmt in FORMAT_OF_EXTENSION.items():
        if lower.endswith(ext):
            return fmt
    raise ImportSpecError(f"{path}: cannot tell the format from the name; give --format csv, tsv or parquet")


# --- events to sessions -------------------------------------------------------------------------

SPLITS = ("train", "validation", "test")


def prepare_events(events: Events, spec: ImportSpec) -> tuple[Events, np.ndarray]:
    """Merged, completed, time-ordered events and their split (0 train, 1 validation, 2 test)."""
    # One event per (user, item): actions united, the first time kept, ties in input order.
    order = np.lexsort((np.arange(len(events)), events.time, events.item, events.user))
    e = events.take(order)
    first = np.ones(len(e), bool)
    first[1:] = (e.user[1:] != e.user[:-1]) | (e.item[1:] != e.item[:-1])
    starts = np.nonzero(first)[0]
    actions = np.bitwise_or.reduceat(e.actions, starts) if len(e) else e.actions
    e, row = e.take(starts), order[starts]  # the merged event's first row, for ties in time
    e.actions = actions
    bit = {a: np.int64(1) << np.int64(i) for i, a in enumerate(spec.actions)}
    changed = True
    while changed:  # implications may chain (a => b, b => c)
        before = e.actions.copy()
        for rule in spec.implications:
            given = np.bitwise_or.reduce([bit[a] for a in rule.given])
            implied = np.bitwise_or.reduce([bit[a] for a in rule.implied])
            e.actions = np.where(e.actions & given, e.actions | implied, e.actions)
        changed = bool((e.actions != before).any())
    e = e.take(np.lexsort((row, e.time, e.user)))  # each user's events in time order, ties in input order
    split = np.zeros(len(e), np.int8)
    if spec.split == "time":
        split[e.time >= spec.validation_from] = 1
        split[e.time >= spec.test_from] = 2
    else:
        lengths = _run_lengths(e.user)
        n_user, position = np.repeat(lengths, lengths), _position_in_user(e.user)
        split[(position == n_user - 1) & (n_user >= 2)] = 2
        split[(position == n_user - 2) & (n_user >= 3)] = 1
    return e, split


def _run_lengths(keys: np.ndarray) -> np.ndarray:
    if not len(keys):
        return np.zeros(0, np.int64)
    starts = np.nonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))[0]
    return np.diff(np.concatenate([starts, [len(keys)]]))


def _position_in_user(user: np.ndarray) -> np.ndarray:
    """Each event's index among its user's events."""
    lengths = _run_lengths(user)
    return np.arange(len(user)) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def session_groups(user: np.ndarray, split: np.ndarray, per_session: int) -> np.ndarray:
    """`[n]` session index of each (time-ordered) event: consecutive events of one user and one
    split, at most `per_session` in a session."""
    if not len(user):
        return np.zeros(0, np.int64)
    run_start = np.concatenate([[True], (user[1:] != user[:-1]) | (split[1:] != split[:-1])])
    run_lengths = _run_lengths(np.cumsum(run_start))
    within = np.arange(len(user)) - np.repeat(np.cumsum(run_lengths) - run_lengths, run_lengths)
    new = run_start | (within % per_session == 0)
    return np.cumsum(new) - 1


def session_tables(events: Events, split: np.ndarray, spec: ImportSpec) -> Iterator[tuple[int, object, int]]:
    """(split index, an Arrow table of sessions in the raw format, its candidates) for time-ordered, split events
    (`prepare_events`), at most SESSIONS_PER_WRITE sessions a table, each split's in order. A
    session's ID mixes its user's ID and its place among the user's sessions (`pair_ids`): the
    same whether all users are built at once or one at a time (the Beam pipeline)."""
    import pyarrow as pa

    group = session_groups(events.user, split, spec.candidates_per_session)
    n_sessions = int(group[-1]) + 1 if len(group) else 0
    starts = np.searchsorted(group, np.arange(n_sessions))  # first event of each session
    ends = np.searchsorted(group, np.arange(n_sessions), side="right")
    user_start = np.arange(len(events)) - _position_in_user(events.user)
    session_split = split[starts]
    session_ids = pair_ids(events.user[starts], _position_in_user(events.user[starts]))
    # Training sessions keep the most recent `max_history` events; validation and test sessions
    # keep all of them, so that next-item evaluation can leave out everything the user has seen
    # (the model still reads only its own history length).
    cap = np.where(session_split == 0, spec.max_history, np.iinfo(np.int64).max // 2)
    hist_start = np.maximum(user_start[starts], starts - cap)

    def items(idx, lengths):
        e = events
        return items_column(e.item[idx], e.author[idx], e.surface[idx], e.actions[idx], lengths, spec.actions)

    for s in range(len(SPLITS)):
        sessions = np.nonzero(session_split == s)[0]
        for chunk in np.array_split(sessions, -(-len(sessions) // SESSIONS_PER_WRITE)) if len(sessions) else []:
            h_len, c_len = starts[chunk] - hist_start[chunk], ends[chunk] - starts[chunk]
            table = {
                "session_id": pa.array(session_ids[chunk]),
                "user_id": pa.array(events.user[starts[chunk]]),
                "history": items(_ranges(hist_start[chunk], h_len), h_len),
                "candidates": items(_ranges(starts[chunk], c_len), c_len),
            }
            yield s, pa.table(table), int(c_len.sum())


def write_sessions(
    events: Events, split: np.ndarray, spec: ImportSpec, out: str, progress: Callable[[int], None] | None = None
) -> dict[str, int]:
    """Writes `out/{train,validation,test}.parquet` in the raw format; returns sessions per split."""
    import pyarrow.parquet as pq

    os.makedirs(out, exist_ok=True)
    tables = session_tables(events, split, spec)
    pending = next(tables, None)
    counts = {}
    for s, name in enumerate(SPLITS):
        counts[name] = 0
        with replaced(os.path.join(out, f"{name}.parquet"), "wb") as f:  # never a half-written split
            writer = pq.ParquetWriter(f, empty_sessions(spec.actions).schema, write_page_checksum=True)
            while pending is not None and pending[0] == s:
                _, table, candidates = pending
                writer.write_table(table.cast(writer.schema))
                counts[name] += table.num_rows
                if progress:
                    progress(candidates)
                pending = next(tables, None)
            writer.close()
    return counts


def empty_sessions(actions: Sequence[str]):
    """A table of no sessions, with the raw format's schema."""
    import pyarrow as pa

    empty = np.zeros(0, np.int64)
    items = items_column(empty, empty, empty, empty, empty, actions)
    return pa.table({"session_id": pa.array(empty), "user_id": pa.array(empty), "history": items, "candidates": items})


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated `arange(start, start + length)` for each pair."""
    total = int(lengths.sum())
    offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(total) + offsets


def import_summary(
    paths: Sequence[str],
    *,
    rows: int,
    skipped: int,
    events: int,
    users: int,
    items: int,
    sessions: dict[str, int],
    action_counts: Sequence[int],
    spec: ImportSpec,
    args: dict,
) -> dict:
    """`import.json`: what an import read and made (`events`: after merging a user's events on
    one item; `action_counts`: those events with each action), whichever engine made it."""
    return {
        "inputs": list(paths),
        "rows": int(rows),
        "rows_skipped": int(skipped),
        "events": int(events),
        "users": int(users),
        "items": int(items),
        "sessions": {name: int(n) for name, n in sessions.items()},
        "action_rates": {
            a: round(float(c) / events, 6) if events else 0.0 for a, c in zip(spec.actions, action_counts, strict=True)
        },
        "args": args,
    }


def write_corpus(events: Events, path: str) -> int:
    """Every item once, with its (first seen) author, as the corpus file of `phoenix-retrieve`."""
    items, first = np.unique(events.item, return_index=True)
    with replaced(path) as f:
        for item, author in zip(items.tolist(), events.author[first].tolist(), strict=True):
            f.write(json.dumps({"post_id": item, "author_id": author}) + "\n")
    return len(items)
