"""phoenix-import and phoenix-prepare as Apache Beam pipelines (the `beam` extra), for logs larger
than one machine: DirectRunner in this process, or Dataflow, Flink or Spark with their pipeline
options. They run the in-memory programs' own reading, session building, serialization and
counting, a file or a user at a time, and give the same sessions, corpus, dataset and statistics.

Import: a task reads a file (`file_events`) and emits each block's events grouped by user; after
the shuffle, a task holds one user's events and builds their sessions (`prepare_events`,
`session_tables`). Sessions go to sharded Parquet (`train-00000-of-00004.parquet`, ...), the
corpus to `corpus.jsonl`, bad rows (with --skip-invalid) to `invalid_rows.jsonl`, the counts to
`import.json`.

Prepare: a task reads a file (`read_sessions`, keys '<file index>:<line>' as in one process) and
serializes its sessions (`session_example`); TFDS's BeamWriter orders them by the same hashed
keys as the in-memory writer, so the dataset's records come in the same order (its shards may
cut them elsewhere); each split's statistics are summed over the files.

Paths go through Beam's filesystems: `gs://` works where Beam's GCP extra is installed.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from phoenix_flax.data.importer import (
    SESSIONS_PER_WRITE,
    SPLITS,
    Events,
    ImportSpec,
    ImportSpecError,
    empty_sessions,
    file_events,
    format_of,
    import_summary,
    prepare_events,
    session_tables,
)
from phoenix_flax.data.raw import InputFileError, SkipReport, read_sessions
from phoenix_flax.errors import PhoenixError

logging.getLogger().setLevel(logging.ERROR)  # before Beam: its import warns of GCP libraries it does not need here
import apache_beam as beam  # noqa: E402
from apache_beam.io.filesystems import FileSystems  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402


def pipeline_options(beam_args: Sequence[str]) -> PipelineOptions:
    """Beam's pipeline options from the program's other arguments (`--runner`, `--temp_location`,
    `--num_workers`, ...), passed through untouched. Beam's own notices are quieted to errors."""
    logging.getLogger().setLevel(logging.ERROR)
    return PipelineOptions(list(beam_args))


def expand(patterns: Sequence[str]) -> list[str]:
    """Globs -> sorted, de-duplicated files, through Beam's filesystems; a pattern matching nothing
    is an error (as `expand_paths`)."""
    paths: list[str] = []
    for pattern in patterns:
        matches = sorted(m.path for r in FileSystems.match([pattern]) for m in r.metadata_list)
        if not matches:
            raise InputFileError(f"no input file matches {pattern!r}")
        paths.extend(m for m in matches if m not in paths)
    return paths


def run(pipeline: beam.Pipeline) -> None:
    """Runs `pipeline` to its end; an expected failure raised in a task (a bad row, a bad
    session) comes out as itself, for the program's one-line error (Beam's log of a task's
    failure is quieted: the failure is raised here, with its traceback where it is a bug)."""
    logging.getLogger("apache_beam").setLevel(logging.CRITICAL)
    try:
        pipeline.run().wait_until_finish()
    except Exception as e:
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, PhoenixError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


class Merged(beam.CombineFn):
    """Combines parts that merge (`SplitStatistics`, `SkipReport`) into a fresh `make()`."""

    def __init__(self, make):
        self.make = make

    def create_accumulator(self):
        return self.make()

    def add_input(self, accumulator, part):
        accumulator.merge(part)
        return accumulator

    def merge_accumulators(self, accumulators):
        first, *rest = accumulators
        for other in rest:
            first.merge(other)
        return first

    def extract_output(self, accumulator):
        return accumulator


class Summed(beam.CombineFn):
    """Sums equal-length count arrays (None for none)."""

    def create_accumulator(self):
        return None

    def add_input(self, total, counts):
        return counts.copy() if total is None else total + counts

    def merge_accumulators(self, totals):
        totals = [t for t in totals if t is not None]
        return sum(totals[1:], totals[0].copy()) if totals else None

    def extract_output(self, total):
        return total


def _write_json(value, path: str) -> None:
    with FileSystems.create(path) as f:
        f.write(json.dumps(value, indent=2).encode())


def read_json(path: str):
    with FileSystems.open(path) as f:
        return json.loads(f.read())


# --- import ---------------------------------------------------------------------------------------

# Events on their way to their user's task, packed as the bytes of these records (56 bytes an
# event): what the shuffle holds, on DirectRunner in this process's memory.
EVENT = np.dtype(
    [
        ("file", "<i8"),
        ("line", "<i8"),
        ("item", "<i8"),
        ("author", "<i8"),
        ("surface", "<i8"),
        ("time", "<f8"),
        ("actions", "<i8"),
    ]
)


class ReadEvents(beam.DoFn):
    """(file index, path) -> (user, their events of a block as EVENT bytes) for each user of each
    block; the count of rows read to 'rows'; bad rows raised, or with `skip_invalid` to 'invalid'."""

    def __init__(self, spec: ImportSpec, fmt: str | None, names, skip_rows: int, skip_invalid: bool):
        self.spec, self.fmt, self.names, self.skip_rows, self.skip_invalid = spec, fmt, names, skip_rows, skip_invalid

    def process(self, element: tuple[int, str]) -> Iterator:
        file_index, path = element
        with FileSystems.open(path, compression_type="uncompressed") as stream:
            for events, lines, errors in file_events(
                path, self.spec, self.fmt or format_of(path), self.names, self.skip_rows, stream
            ):
                if errors and not self.skip_invalid:
                    raise min(errors, key=lambda e: e.line)
                for e in errors:
                    yield beam.pvalue.TaggedOutput("invalid", (e.path, e.line, e.field, e.problem))
                yield beam.pvalue.TaggedOutput("rows", len(events) + len(errors))
                packed = np.empty(len(events), EVENT)
                packed["file"], packed["line"] = file_index, lines
                for name in ("item", "author", "surface", "time", "actions"):
                    packed[name] = getattr(events, name)
                order = np.argsort(events.user, kind="stable")
                users, starts = np.unique(events.user[order], return_index=True)
                for user, rows in zip(users.tolist(), np.split(order, starts[1:]), strict=True):
                    yield user, packed[rows].tobytes()


class UserSessions(beam.DoFn):
    """(user, their EVENT bytes) -> the user's sessions, written by this task to its own Parquet
    files in `temp_dir` (SESSIONS_PER_WRITE a row group, as the in-memory writer's: no session
    passes through the runner), their paths to 'written' at the bundle's end; (item, (user,
    author)) to 'corpus' and the user's counts to 'counts'."""

    def __init__(self, spec: ImportSpec, temp_dir: str):
        self.spec, self.temp_dir = spec, temp_dir

    def start_bundle(self) -> None:
        self.pending: list[list] = [[] for _ in SPLITS]  # tables of users' sessions, per split
        self.pending_rows = [0] * len(SPLITS)
        self.writers: dict[int, tuple[str, object, object]] = {}  # split -> (path, file, ParquetWriter)

    def _write(self, s: int) -> None:
        import pyarrow.parquet as pq

        if not self.pending[s]:
            return
        if s not in self.writers:
            path = os.path.join(self.temp_dir, f"{SPLITS[s]}-{uuid.uuid4().hex}.parquet")
            f = FileSystems.create(path)
            schema = empty_sessions(self.spec.actions).schema
            self.writers[s] = (path, f, pq.ParquetWriter(f, schema, write_page_checksum=True))
        writer = self.writers[s][2]
        writer.write_table(pa.concat_tables([t.cast(writer.schema) for t in self.pending[s]]))  # a row group
        self.pending[s], self.pending_rows[s] = [], 0

    def finish_bundle(self) -> Iterator:
        for s in range(len(SPLITS)):
            self._write(s)
        for s, (path, f, writer) in self.writers.items():
            writer.close()
            f.close()
            yield beam.pvalue.TaggedOutput("written", beam.transforms.window.GlobalWindows.windowed_value((s, path)))

    def process(self, element: tuple[int, Iterable[bytes]]) -> Iterator:
        user, blocks = element
        e = np.frombuffer(b"".join(blocks), EVENT)
        e = e[np.lexsort((e["line"], e["file"]))]  # ties in time keep the input's order, as in one process
        events = Events(
            np.full(len(e), user, np.int64), *(e[n].copy() for n in ("item", "author", "surface", "time", "actions"))
        )
        events, split = prepare_events(events, self.spec)
        sessions = np.zeros(len(SPLITS), np.int64)
        for s, table, _ in session_tables(events, split, self.spec):
            sessions[s] += table.num_rows
            self.pending[s].append(table)
            self.pending_rows[s] += table.num_rows
            if self.pending_rows[s] >= SESSIONS_PER_WRITE:
                self._write(s)
        for i, a in zip(events.item.tolist(), events.author.tolist(), strict=True):
            yield beam.pvalue.TaggedOutput("corpus", (i, (user, a)))
        bits = (events.actions[:, None] >> np.arange(len(self.spec.actions))) & 1
        yield beam.pvalue.TaggedOutput("counts", np.concatenate([[1, len(events)], sessions, bits.sum(0)]))


def _name_shards(written: list[tuple[int, str]], out: str, temp_dir: str, actions: Sequence[str]) -> None:
    """Moves the sessions' files of the tasks that succeeded to `out/SPLIT-00000-of-0000N.parquet`
    (an empty one for a split without sessions) and removes the temporary folder (with the files
    of tasks that failed and were retried)."""
    import pyarrow.parquet as pq

    for s, name in enumerate(SPLITS):
        paths = sorted(path for split, path in written if split == s)
        if not paths:
            with FileSystems.create(os.path.join(out, f"{name}-00000-of-00001.parquet")) as f:
                pq.write_table(empty_sessions(actions), f, write_page_checksum=True)
        for i, path in enumerate(paths):
            FileSystems.rename([path], [os.path.join(out, f"{name}-{i:05d}-of-{len(paths):05d}.parquet")])
    if FileSystems.exists(temp_dir):
        FileSystems.delete([temp_dir])


def _corpus_line(item_and_first: tuple[int, tuple[int, int]]) -> str:
    item, (_, author) = item_and_first
    return json.dumps({"post_id": item, "author_id": author})


def _summary(_, counts, rows, skipped, items, spec: ImportSpec, paths: Sequence[str], args: dict) -> dict:
    if counts is None:  # no events
        counts = np.zeros(2 + len(SPLITS) + len(spec.actions), np.int64)
    return import_summary(
        paths,
        rows=rows,
        skipped=skipped,
        events=counts[1],
        users=counts[0],
        items=items,
        sessions=dict(zip(SPLITS, counts[2 : 2 + len(SPLITS)], strict=True)),
        action_counts=counts[2 + len(SPLITS) :],
        spec=spec,
        args=args,
    )


def import_with_beam(
    paths: Sequence[str],
    spec: ImportSpec,
    out: str,
    options: PipelineOptions,
    *,
    fmt: str | None = None,
    names: Sequence[str] | None = None,
    skip_rows: int = 0,
    skip_invalid: bool = False,
    args: dict | None = None,
) -> dict:
    """Runs the import pipeline; returns what it wrote to `out/import.json`."""
    existing = [m.path for r in FileSystems.match([os.path.join(out, "*.parquet")]) for m in r.metadata_list]
    if existing:
        raise ImportSpecError(f"--out {out} already holds sessions ({existing[0]}, ...): give an empty folder")
    if not FileSystems.exists(out):
        FileSystems.mkdirs(out)
    summary_path = os.path.join(out, "import.json")
    p = beam.Pipeline(options=options)
    read = (
        p
        | "Inputs" >> beam.Create(list(enumerate(paths)))
        | "Read"
        >> beam.ParDo(ReadEvents(spec, fmt, names, skip_rows, skip_invalid)).with_outputs(
            "invalid", "rows", main="events"
        )
    )
    temp_dir = os.path.join(out, f".beam-temp-{uuid.uuid4().hex}")
    built = (
        read.events
        | "ByUser" >> beam.GroupByKey()
        | "Sessions" >> beam.ParDo(UserSessions(spec, temp_dir)).with_outputs("written", "corpus", "counts")
    )
    _ = (
        built.written
        | "AllWritten" >> beam.combiners.ToList()
        | "Shards" >> beam.Map(_name_shards, out=out, temp_dir=temp_dir, actions=spec.actions)
    )
    corpus = built.corpus | "FirstUser" >> beam.CombinePerKey(min)
    _ = (
        corpus
        | "CorpusLines" >> beam.Map(_corpus_line)
        | "WriteCorpus" >> beam.io.WriteToText(os.path.join(out, "corpus"), ".jsonl", shard_name_template="")
    )
    if skip_invalid:
        _ = (
            read.invalid
            | "InvalidLines" >> beam.MapTuple(_invalid_line)
            | "WriteInvalid" >> beam.io.WriteToText(os.path.join(out, "invalid_rows"), ".jsonl", shard_name_template="")
        )
    _ = (
        p
        | "Once" >> beam.Create([None])
        | "Summary"
        >> beam.Map(
            _summary,
            counts=beam.pvalue.AsSingleton(built.counts | "Counts" >> beam.CombineGlobally(Summed())),
            rows=beam.pvalue.AsSingleton(read.rows | "Rows" >> beam.CombineGlobally(sum)),
            skipped=beam.pvalue.AsSingleton(read.invalid | "Skipped" >> beam.combiners.Count.Globally()),
            items=beam.pvalue.AsSingleton(corpus | "Items" >> beam.combiners.Count.Globally()),
            spec=spec,
            paths=paths,
            args=args or {},
        )
        | "WriteSummary" >> beam.Map(_write_json, summary_path)
    )
    run(p)
    return read_json(summary_path)


def _invalid_line(path: str, line: int, column: str | None, problem: str) -> str:
    return json.dumps({"file": path, "line": line, "column": column, "problem": problem})


# --- prepare --------------------------------------------------------------------------------------


class ReadSessions(beam.DoFn):
    """(file index, path) of a split -> (key, serialized example) of its sessions that the split
    keeps; the file's SplitStatistics to 'statistics' and SkipReport to 'skipped'."""

    def __init__(self, source, actions: Sequence[str], skip_invalid: bool):
        self.source, self.actions, self.skip_invalid = source, tuple(actions), skip_invalid

    def process(self, element: tuple[int, str]) -> Iterator:
        from phoenix_flax.data.prepare import SplitStatistics, session_example

        file_index, path = element
        stats, report = SplitStatistics(self.actions), SkipReport()
        sessions = read_sessions(
            [path],
            self.actions,
            skip_invalid=self.skip_invalid,
            report=report,
            first_file_index=file_index,
            opener=lambda p: FileSystems.open(p, compression_type="uncompressed"),
        )
        for key, session in sessions:
            if self.source.keeps(key):
                stats.add(session)
                yield key, session_example(session)
        yield beam.pvalue.TaggedOutput("statistics", stats)
        yield beam.pvalue.TaggedOutput("skipped", report)


def _split_report(stats, reports: SkipReport) -> dict:
    return {"statistics": stats.to_dict(), "skipped": dict(reports.counts), "examples": reports.examples}


def beam_splits(builder, options: PipelineOptions, shard_config) -> list:
    """The splits of a `PhoenixSessions` builder written by one Beam pipeline: TFDS's BeamWriter
    with the in-memory writer's serializer, keys and hash salt. Fills `builder.statistics` and
    `builder.skip_reports`; returns TFDS's SplitInfos."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import writer as tfds_writer

    from phoenix_flax.data.prepare import SplitStatistics, _Serialized

    p = beam.Pipeline(options=options)
    writers, side_files = {}, {}
    for split, source in builder._sources.items():
        template = builder._get_filename_template(split)
        writers[split] = tfds_writer.BeamWriter(
            serializer=_Serialized(builder.info.features.get_serialized_info()),
            filename_template=template,
            hash_salt=split,
            disable_shuffling=False,
            example_writer=builder._example_writer(),
            shard_config=shard_config,
        )
        read = (
            p
            | f"{split}/Inputs" >> beam.Create(list(enumerate(source.paths)))
            | f"{split}/Read"
            >> beam.ParDo(ReadSessions(source, builder._actions, builder._skip_invalid)).with_outputs(
                "statistics", "skipped", main="examples"
            )
        )
        _ = read.examples | f"{split}/Write" >> beam.ptransform_fn(writers[split].write_from_pcollection)()
        side_files[split] = os.path.join(os.fspath(template.data_dir), f"{split}.phoenix_statistics.json")
        skipped = read.skipped | f"{split}/Skipped" >> beam.CombineGlobally(Merged(SkipReport))
        _ = (
            read.statistics
            | f"{split}/Statistics"
            >> beam.CombineGlobally(Merged(functools.partial(SplitStatistics, builder._actions)))
            | f"{split}/Report" >> beam.Map(_split_report, reports=beam.pvalue.AsSingleton(skipped))
            | f"{split}/WriteStatistics" >> beam.Map(_write_json, side_files[split])
        )
    run(p)
    infos = []
    for split, writer in writers.items():
        side = read_json(side_files[split])
        FileSystems.delete([side_files[split]])
        builder.statistics[split] = side["statistics"]
        report = SkipReport()
        report.counts.update(side["skipped"])
        report.examples.update(side["examples"])
        builder.skip_reports[builder._sources[split].paths] = report
        shard_lengths, size = writer.finalize()
        template = builder._get_filename_template(split)
        infos.append(
            tfds.core.SplitInfo(name=split, shard_lengths=shard_lengths, num_bytes=size, filename_template=template)
        )
    return infos
