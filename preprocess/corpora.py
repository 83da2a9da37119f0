"""Corpora beyond WebVid: segment lists (Panda-70M, InternVid), whole-file lists (OpenVid-1M), a generic
manifest with a column mapping, and a plain folder of videos with sidecar captions.

Each is streamed into plan rows (``preprocess.plan``), one row per sample, so the driver holds one batch
at a time whatever the corpus size. A row is ``{"videoid", "caption", "source"}`` plus, for a segment,
``start``/``end`` in seconds of the source video. The video is found under ``--videos`` by its id or
relative path (``source = {"videos", "find"}``, see ``preprocess.steps.find_video``); a row that cannot be
used carries ``source = {"error", "reason"}`` and becomes a failed row with that reason.
"""

from __future__ import annotations

import ast
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.config import ConfigError

# what "any common extension" means for a video found by id (tried in this order)
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".flv", ".mpg", ".mpeg", ".ts")
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
# the fields a manifest maps to its columns: video and caption always; start and end together, or
# ``timestamp``, a list of [start, end] pairs whose caption column is the list of their captions
FIELDS = ("video", "caption", "start", "end", "timestamp")
# each preset's published columns (checked against the datasets' own repositories, docs/DATA.md)
PRESETS: dict[str, dict[str, str]] = {
    # snap-research/Panda-70M dataset_dataloading: videoID,url,timestamp,caption,matching_score
    "panda70m": {"video": "videoID", "caption": "caption", "timestamp": "timestamp"},
    # OpenGVLab/InternVid-10M-FLT (jsonlines): YoutubeID, Start_timestamp, End_timestamp, Caption, ...
    "internvid": {
        "video": "YoutubeID",
        "caption": "Caption",
        "start": "Start_timestamp",
        "end": "End_timestamp",
    },
    # nkp37/OpenVid-1M OpenVid-1M.csv: video,caption,aesthetic score,motion score,...,frame,fps,seconds
    "openvid": {"video": "video", "caption": "caption"},
}
BATCH_ROWS = 4096
_TIME = re.compile(r"^(?:(\d+):)?(\d{1,2}):(\d{1,2}(?:\.\d*)?)$")


def parse_time(value: Any) -> float:
    """Seconds from a number, ``"12.5"``, ``"H:MM:SS.mmm"`` or ``"MM:SS.mmm"``; ValueError otherwise."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"not a time: {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip()
        m = _TIME.match(text)
        if m:
            h, mm, ss = m.groups()
            if int(mm) >= 60 or float(ss) >= 60:
                raise ValueError(f"not a time: {value!r}")
            seconds = int(h or 0) * 3600 + int(mm) * 60 + float(ss)
        else:
            seconds = float(text)  # raises ValueError on anything else
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise ValueError(f"not a time: {value!r}")
    return seconds


def column_mapping(dataset: str, columns: str | None) -> dict[str, str]:
    """The preset's mapping with ``--columns field=column,...`` applied on top (manifest: the flag only)."""
    mapping = dict(PRESETS.get(dataset, {}))
    for item in filter(None, (columns or "").split(",")):
        field, sep, column = item.partition("=")
        field, column = field.strip(), column.strip()
        if not sep or not column or field not in FIELDS:
            raise ConfigError(
                f"columns: {item!r} is not field=column with field one of {', '.join(FIELDS)} "
                "(e.g. --columns video=path,caption=text,start=t0,end=t1)"
            )
        mapping[field] = column
    if "timestamp" in mapping and ("start" in mapping or "end" in mapping):
        if columns and "timestamp" in columns:
            raise ConfigError("columns: map either timestamp (a list of [start, end]) or start and end")
        mapping.pop("timestamp")  # start/end given for a preset with a list column
    missing = [f for f in ("video", "caption") if f not in mapping]
    if missing:
        raise ConfigError(f"columns: no column for {', '.join(missing)} (--columns video=...,caption=...)")
    if ("start" in mapping) != ("end" in mapping):
        raise ConfigError("columns: map both start and end, or neither")
    return mapping


def manifest_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"annotations: {str(p)!r} does not exist")
    if p.is_file():
        if p.suffix.lower() not in MANIFEST_SUFFIXES:
            raise ConfigError(f"annotations: {p.name!r} is not one of {', '.join(MANIFEST_SUFFIXES)}")
        return [p]
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in MANIFEST_SUFFIXES and f.is_file())
    if not files:
        raise ConfigError(f"annotations: no {', '.join(MANIFEST_SUFFIXES)} files in folder {str(p)!r}")
    return files


def check_columns(path: Path, mapping: dict[str, str]) -> None:
    """Refuse a file that lacks a mapped column (CSV/TSV/Parquet: from the header; JSONL as it is read)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            names = pq.read_schema(path).names
        elif suffix in (".csv", ".tsv"):
            with pacsv.open_csv(path, parse_options=_csv_options(path, lambda row: "skip")) as reader:
                names = reader.schema.names
        else:
            return
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(f"annotations: cannot read {str(path)!r}: {e}") from None
    missing = [c for c in mapping.values() if c not in names]
    if missing:
        raise ConfigError(
            f"annotations: {str(path)!r} lacks column(s) {', '.join(missing)} (has: {', '.join(names)}); "
            "map them with --columns field=column"
        )


def _csv_options(path: Path, on_invalid=None) -> pacsv.ParseOptions:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    return pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True, invalid_row_handler=on_invalid)


def _error(why: str, reason: str, videoid: Any = None) -> dict[str, Any]:
    return {"videoid": None if videoid is None else str(videoid), "caption": None,
            "source": {"error": why, "reason": reason}}  # fmt: skip


def _table_records(path: Path, mapping: dict[str, str]) -> Iterator[dict[str, Any] | str]:
    """The mapped columns of each record, in file order; a record that cannot be parsed is its error text."""
    suffix = path.suffix.lower()
    wanted = list(dict.fromkeys(mapping.values()))
    if suffix == ".parquet":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=wanted):
            yield from batch.to_pylist()
    elif suffix in (".csv", ".tsv"):
        bad: list[str] = []

        def on_invalid(row) -> str:
            bad.append(
                f"malformed CSV record {row.number - 1 if row.number else '?'} of {path.name} (after the "
                f"header): {row.actual_columns} fields, expected {row.expected_columns}: {row.text[:80]!r}"
            )
            return "skip"

        convert = pacsv.ConvertOptions(
            column_types={c: pa.string() for c in wanted}, include_columns=wanted, strings_can_be_null=True
        )
        read = pacsv.ReadOptions(block_size=1 << 18, use_threads=False)  # small blocks, records in order
        try:
            with pacsv.open_csv(
                path, read_options=read, parse_options=_csv_options(path, on_invalid), convert_options=convert
            ) as reader:
                for batch in reader:
                    yield from batch.to_pylist()
        except pa.ArrowInvalid as e:
            raise ConfigError(f"annotations: cannot parse {str(path)!r}: {e}") from None
        yield from bad
    else:  # JSON lines (a .json file too: one record per line)
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    yield f"malformed JSON record on line {n} of {path.name}: {line[:80]!r}"
                    continue
                if not isinstance(rec, dict):
                    yield f"malformed JSON record on line {n} of {path.name}: not an object"
                    continue
                yield {c: rec.get(c) for c in wanted}


def _segment_row(vid: Any, caption: Any, videos: str, start: Any, end: Any) -> dict[str, Any]:
    row = {"videoid": _stem(str(vid)), "caption": caption, "source": {"videos": videos, "find": str(vid)}}
    try:
        row["start"], row["end"] = parse_time(start), parse_time(end)
    except ValueError:
        return _error(f"segment times {start!r}, {end!r} are not seconds or H:MM:SS.mmm", "bad_segment", vid)
    return row


def _literal_list(text: Any) -> list | None:
    """A Python/JSON list written into a CSV field (Panda-70M writes ``[['0:00:00.000', ...], ...]``)."""
    if isinstance(text, list):
        return text
    try:
        value = ast.literal_eval(str(text))
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    return value if isinstance(value, list) else None


def _expand(rec: dict[str, Any], mapping: dict[str, str], videos: str) -> list[dict[str, Any]]:
    """One record -> its rows: one, or one per segment of a ``timestamp`` list."""
    vid = rec.get(mapping["video"])
    if vid is None or not str(vid).strip():
        return [_error("empty video id/path", "missing_videoid")]
    caption = rec.get(mapping["caption"])
    if "timestamp" in mapping:
        spans, captions = _literal_list(rec.get(mapping["timestamp"])), _literal_list(caption)
        if spans is None or captions is None or len(spans) != len(captions) or not spans:
            return [
                _error(
                    f"timestamp and caption must be lists of the same length: {str(rec)[:120]}",
                    "malformed_record",
                    vid,
                )
            ]
        rows = []
        for k, (span, text) in enumerate(zip(spans, captions, strict=True)):
            ok = isinstance(span, list | tuple) and len(span) == 2
            row = _segment_row(vid, text, videos, *(span if ok else (span, None)))
            rows.append({**row, "segment": k})
        return rows
    if "start" in mapping:
        start, end = rec.get(mapping["start"]), rec.get(mapping["end"])
        if not (_blank(start) and _blank(end)):  # both empty: the whole file
            return [_segment_row(vid, caption, videos, start, end)]
    return [{"videoid": _stem(str(vid)), "caption": caption, "source": {"videos": videos, "find": str(vid)}}]


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _stem(path: str) -> str:
    """A video's id from its path: the path without a video extension (``a/b.mp4`` -> ``a/b``)."""
    root, ext = os.path.splitext(path)
    return root if ext.lower() in VIDEO_EXTENSIONS else path


def manifest_rows(files: list[Path], mapping: dict[str, str], videos: str) -> Iterator[list[dict]]:
    """Rows of every file, in order, in batches of about ``BATCH_ROWS``."""
    batch: list[dict[str, Any]] = []
    for path in files:
        for rec in _table_records(path, mapping):
            batch.extend(
                _expand(rec, mapping, videos) if isinstance(rec, dict) else [_error(rec, "malformed_record")]
            )
            if len(batch) >= BATCH_ROWS:
                yield batch
                batch = []
    if batch:
        yield batch


def folder_rows(videos: str) -> Iterator[list[dict]]:
    """A folder of videos, each with a sidecar caption ``NAME.txt`` beside ``NAME.mp4``; sorted walk.

    A video without its caption file is a failed row (``missing_caption``); text files without a video
    are not rows."""
    root = Path(videos)
    batch: list[dict[str, Any]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        names = set(filenames)
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in VIDEO_EXTENSIONS:
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            vid = _stem(rel)
            if f"{stem}.txt" not in names:
                batch.append(_error(f"no caption file {stem}.txt beside {rel}", "missing_caption", vid))
            else:
                try:
                    caption = (
                        Path(dirpath, f"{stem}.txt").read_text(encoding="utf-8", errors="replace").strip()
                    )
                except OSError as e:
                    batch.append(_error(f"{stem}.txt: {e.strerror}", "missing_caption", vid))
                    continue
                batch.append({"videoid": vid, "caption": caption, "source": {"videos": videos, "find": rel}})
            if len(batch) >= BATCH_ROWS:
                yield batch
                batch = []
    if batch:
        yield batch
