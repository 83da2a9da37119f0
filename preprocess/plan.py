"""The shard plan: input rows streamed into ``_plan.arrow`` (one record batch per shard), never held.

The driver reads the annotations with pyarrow's streaming CSV reader, cuts them into shards of
``samples_per_shard`` rows as Arrow batches and writes each batch to the plan file in the output
folder. What it keeps is one :class:`ShardPlan` per shard (first row, row count, a digest of the
rows' content), so its memory does not grow with the number of rows. Workers read their shard's
batch from the plan file (memory-mapped, O(1) per shard). The digest keys resume: a shard is reused
only when the rows it was made from are the rows it would be made from now.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from pipeline.config import ConfigError
from pipeline.shards import PLAN_FILE, commit, tmp_path
from preprocess.config import PreprocessConfig

WEBVID_COLUMNS = ("videoid", "page_dir", "name")
# a WebVid row is its columns; any other row (tars, instruction sets, a malformed CSV record) is JSON
PLAN_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("videoid", pa.string()),
        ("page_dir", pa.string()),
        ("caption", pa.string()),
        ("record", pa.string()),
    ]
)
NULLS = ["", "NaN", "nan", "NULL", "null", "None"]
# inputs read by preprocess.corpora: --annotations + --videos (the folder reader: --videos only)
CORPORA = ("panda70m", "internvid", "openvid", "manifest", "folder")


@dataclass(frozen=True)
class ShardPlan:
    """One shard of the job: input rows ``first_row .. first_row + rows - 1`` and their digest."""

    shard: int
    first_row: int
    rows: int
    digest: str


# ---- reading annotations -------------------------------------------------------------------------


def annotation_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"annotations: {str(p)!r} does not exist")
    if p.is_file():
        return [p]
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in (".csv", ".tsv") and f.is_file())
    if not files:
        raise ConfigError(f"annotations: no .csv or .tsv files in folder {str(p)!r}")
    return files


def _parse_options(path: Path, on_invalid=None) -> pacsv.ParseOptions:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # captions may hold quoted newlines: every read (the header probe too) must allow them
    return pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True, invalid_row_handler=on_invalid)


def check_header(path: Path) -> None:
    """Refuse a file without WebVid's columns (reads only the first block)."""
    try:
        # bad records are accounted when the file is read, not here
        with pacsv.open_csv(path, parse_options=_parse_options(path, lambda row: "skip")) as reader:
            header = reader.schema.names
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(f"annotations: cannot parse {str(path)!r}: {e}") from None
    if twice := [c for c in WEBVID_COLUMNS if header.count(c) > 1]:
        raise ConfigError(
            f"annotations: {str(path)!r} has {', '.join(f'{header.count(c)} {c!r} columns' for c in twice)}; "
            "which one holds the value is ambiguous: keep one"
        )
    missing = [c for c in WEBVID_COLUMNS if c not in header]
    if missing:
        raise ConfigError(
            f"annotations: {str(path)!r} lacks column(s) {', '.join(missing)} (has: {', '.join(header)}); "
            f"WebVid annotations need {', '.join(WEBVID_COLUMNS)}"
        )


def _malformed_record(path: Path, row: Any) -> str:
    return (
        f"malformed CSV record {row.number - 1 if row.number else '?'} of {path.name} (after the header): "
        f"{row.actual_columns} fields, expected {row.expected_columns}: {row.text[:80]!r}"
    )


def stream_csv(path: Path, batch_rows: int = 1 << 16) -> Iterator[pa.RecordBatch]:
    """A WebVid CSV/TSV as batches of ``videoid, page_dir, caption, record``; a record with the wrong
    number of fields becomes a row of its own (``record`` holds its error) after the file's rows."""
    bad: list[str] = []
    convert = pacsv.ConvertOptions(
        column_types={c: pa.string() for c in WEBVID_COLUMNS},
        include_columns=list(WEBVID_COLUMNS),
        strings_can_be_null=True,
        null_values=NULLS,
    )
    # small blocks: the driver's transient Arrow memory is a few blocks (4 MB blocks peaked at +130 MB
    # of Arrow memory on a 2M-row CSV, 256 KB ones at +15 MB), and one thread keeps records in order
    options = pacsv.ReadOptions(block_size=1 << 18, use_threads=False)

    def on_invalid(row) -> str:
        bad.append(_malformed_record(path, row))
        return "skip"

    try:
        with pacsv.open_csv(
            path,
            read_options=options,
            parse_options=_parse_options(path, on_invalid),
            convert_options=convert,
        ) as reader:
            for batch in reader:
                if batch.num_rows:
                    yield pa.record_batch(
                        [
                            batch.column(0),
                            batch.column(1),
                            batch.column(2),
                            pa.nulls(batch.num_rows, pa.string()),
                        ],
                        names=["videoid", "page_dir", "caption", "record"],
                    )
    except pa.ArrowInvalid as e:
        raise ConfigError(f"annotations: cannot parse {str(path)!r}: {e}") from None
    for message in bad:
        yield _records_batch([{"videoid": None, "caption": None, "source": {"error": message}}])


def _records_batch(rows: list[dict[str, Any]]) -> pa.RecordBatch:
    """Rows of any reader (tars, instruction sets) as plan columns; the whole row travels as JSON."""
    return pa.record_batch(
        [
            pa.array([None if r.get("videoid") is None else str(r["videoid"]) for r in rows], pa.string()),
            pa.nulls(len(rows), pa.string()),
            pa.array([r.get("caption") for r in rows], pa.string()),
            pa.array([json.dumps({k: v for k, v in r.items() if k != "row"}) for r in rows], pa.string()),
        ],
        names=["videoid", "page_dir", "caption", "record"],
    )


def _chunks(rows: list[dict[str, Any]], n: int = 4096) -> Iterator[pa.RecordBatch]:
    for i in range(0, len(rows), n):
        yield _records_batch(rows[i : i + n])


def check_inputs(cfg: PreprocessConfig) -> None:
    """What can be checked about a WebVid input without reading it: the videos folder, the files and
    their headers (tars and instruction sets are checked as they are read)."""
    if cfg.tars or cfg.dataset not in ("webvid", *CORPORA):
        return
    vdir = Path(cfg.videos)
    if not vdir.is_dir():
        raise ConfigError(f"videos: {str(vdir)!r} is not a folder")
    if not os.access(vdir, os.R_OK | os.X_OK):
        raise ConfigError(f"videos: folder {str(vdir)!r} is not readable")
    if cfg.dataset in CORPORA:
        from preprocess.corpora import check_columns, column_mapping, manifest_files

        if cfg.dataset != "folder":
            mapping = column_mapping(cfg.dataset, cfg.columns)
            for f in manifest_files(cfg.annotations):
                check_columns(f, mapping)
        return
    for f in annotation_files(cfg.annotations):
        check_header(f)


def input_batches(cfg: PreprocessConfig) -> Iterator[pa.RecordBatch]:
    """Every input row, in order, as plan batches (without the ``row`` column)."""
    from preprocess.inputs import read_instructions, read_tars

    if cfg.tars:
        yield from _chunks(read_tars(cfg.tars, cfg.limit))
    elif cfg.dataset == "folder":
        from preprocess.corpora import folder_rows

        yield from map(_records_batch, folder_rows(cfg.videos))
    elif cfg.dataset in CORPORA:
        from preprocess.corpora import column_mapping, manifest_files, manifest_rows

        mapping = column_mapping(cfg.dataset, cfg.columns)
        yield from map(_records_batch, manifest_rows(manifest_files(cfg.annotations), mapping, cfg.videos))
    elif cfg.dataset == "webvid":
        for f in annotation_files(cfg.annotations):
            yield from stream_csv(f)
    else:
        media = cfg.images if cfg.is_image_dataset else cfg.videos
        yield from _chunks(read_instructions(cfg.dataset, cfg.annotations, media, cfg.limit))


# ---- cutting shards --------------------------------------------------------------------------------


def _shard_batches(batches: Iterable[pa.RecordBatch], per_shard: int, limit: int | None):
    """Re-cut a stream of batches into batches of exactly ``per_shard`` rows (the last one shorter)."""
    pending: list[pa.RecordBatch] = []
    have, start = 0, 0
    for batch in batches:
        if limit is not None and start + have + batch.num_rows > limit:
            batch = batch.slice(0, max(0, limit - start - have))
        pending.append(batch)
        have += batch.num_rows
        while have >= per_shard:
            table = pa.Table.from_batches(pending)
            yield start, table.slice(0, per_shard)
            rest = table.slice(per_shard)
            pending, have, start = rest.to_batches(), have - per_shard, start + per_shard
        if limit is not None and start + have >= limit:
            break
    if have:
        yield start, pa.Table.from_batches(pending)


def _column_bytes(h, column: pa.ChunkedArray | pa.Array) -> None:
    """Feed a column's values (not its memory layout) to the hash: nulls, lengths, data."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    h.update(np.asarray(arr.is_null()).tobytes())
    if pa.types.is_integer(arr.type):
        h.update(np.asarray(arr.fill_null(0), dtype=np.int64).tobytes())
        return
    arr = arr.fill_null("")
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1]
    h.update((offsets - offsets[0]).astype(np.int64).tobytes())
    data = arr.buffers()[2]
    if data is not None and offsets[-1] > offsets[0]:
        h.update(memoryview(data)[offsets[0] : offsets[-1]])


def digest(table: pa.Table) -> str:
    """Content hash of a shard's rows (row numbers included), independent of how batches were cut."""
    h = hashlib.sha256()
    for name in PLAN_SCHEMA.names:
        h.update(name.encode())
        _column_bytes(h, table.column(name))
    return h.hexdigest()[:32]


def write_plan(cfg: PreprocessConfig) -> list[ShardPlan]:
    """Stream the input into ``OUTPUT/_plan.arrow``; returns one :class:`ShardPlan` per shard."""
    final = Path(cfg.output) / PLAN_FILE
    tmp = tmp_path(final)
    plans: list[ShardPlan] = []
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, PLAN_SCHEMA) as writer:
            for start, table in _shard_batches(input_batches(cfg), cfg.samples_per_shard, cfg.limit):
                rows = pa.array(np.arange(start, start + table.num_rows, dtype=np.int64))
                table = table.add_column(0, "row", rows).combine_chunks()
                writer.write_table(table, max_chunksize=max(1, table.num_rows))
                plans.append(ShardPlan(len(plans), start, table.num_rows, digest(table)))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    commit(tmp, final)
    return plans


# ---- the worker side -------------------------------------------------------------------------------


def read_shard_rows(cfg: PreprocessConfig, shard: int, lo: int = 0, hi: int | None = None) -> list[dict]:
    """Rows ``lo:hi`` of one shard as the per-row steps take them (see ``preprocess.inputs``)."""
    with pa.memory_map(str(Path(cfg.output) / PLAN_FILE)) as src:
        batch = pa.ipc.open_file(src).get_batch(shard)
        batch = batch.slice(lo, (hi if hi is not None else batch.num_rows) - lo)
        records = batch.to_pylist()
    return [_row(r, cfg.videos) for r in records]


def _row(r: dict[str, Any], videos: str | None) -> dict[str, Any]:
    if r["record"] is not None:
        return {"row": r["row"], **json.loads(r["record"])}
    return {
        "row": r["row"],
        "videoid": r["videoid"],
        "page_dir": r["page_dir"],
        "caption": r["caption"],
        "source": {"videos": videos, "page_dir": r["page_dir"], "videoid": r["videoid"]},
    }
