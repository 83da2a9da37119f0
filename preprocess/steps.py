"""The per-row steps of the preprocessing job; each is a small function, failures are values.

A work unit (``process_unit``: a shard or a slice of one) runs them over its rows: check the row and
locate its video (``resolve_source``), decode and sample frames (``BoundedDecoder``), clean the caption
(``clean_caption``), write the sample (``ShardWriter``). Any failure becomes an index row with a
reason; nothing raises out.
"""

from __future__ import annotations

import os
import stat
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.captions import clean_caption
from pipeline.shards import (
    INDEX_SCHEMA,
    PARTS_DIR,
    STAGING_DIR,
    ShardWriter,
    commit,
    concat_tars,
    read_shard,
    sample_key,
    shard_name,
    tmp_path,
    write_parquet,
    write_part,
)
from pipeline.video import BoundedDecoder, DecodeFailure, SamplingSpec
from preprocess.config import PreprocessConfig
from preprocess.corpora import VIDEO_EXTENSIONS
from preprocess.inputs import is_missing
from preprocess.plan import read_shard_rows


def resolve_source(row: dict[str, Any]) -> dict[str, Any]:
    """Check a row and find its media; raises ``DecodeFailure`` with the row's reason."""
    src = row["source"]
    if "error" in src:
        err = src["error"]
        reason = src.get("reason") or (
            "malformed_record"
            if err.startswith("malformed")
            else "missing_file"
            if "no .mp4" in err
            else "unreadable_tar"
        )
        raise DecodeFailure(reason, err)
    if "conversations" not in row and is_missing(row.get("caption")):
        raise DecodeFailure("missing_caption", "empty or NaN caption")
    if "tar" in src:
        if src["size"] == 0:
            raise DecodeFailure("empty_file", f"{src['member']} is 0 bytes")
        return src
    if "media" in src:  # instruction sets: a path relative to --images / --videos
        return _checked_path(src["media"], str(src["rel"]))
    if "find" in src:  # corpora and manifests: an id or a relative path under --videos
        return {**find_video(src["videos"], src["find"]), **segment(row)}
    if is_missing(src["videoid"]):
        raise DecodeFailure("missing_videoid", "empty videoid")
    if is_missing(src["page_dir"]):
        raise DecodeFailure("empty_page_dir", "empty page_dir: the video's folder is unknown")
    return _checked_path(src["videos"], os.path.join(str(src["page_dir"]), f"{src['videoid']}.mp4"))


def find_video(root: str, name: str) -> dict[str, Any]:
    """``name`` under ``root``: as given when it ends in a video extension, else ``name`` + the first
    of ``VIDEO_EXTENSIONS`` that exists. Never a file outside ``root`` (``_checked_path``)."""
    if os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS:
        return _checked_path(root, name)
    for ext in VIDEO_EXTENSIONS:
        try:
            return _checked_path(root, name + ext)
        except DecodeFailure as e:
            if e.reason != "missing_file":
                raise
    raise DecodeFailure(
        "missing_file", f"no {name}.{{{','.join(e[1:] for e in VIDEO_EXTENSIONS)}}} in the videos folder"
    )


def segment(row: dict[str, Any]) -> dict[str, float]:
    """The row's ``start``/``end`` (seconds) for the decoder; ``{}`` for a whole-file row. What needs the
    video (outside it, shorter than a frame) is judged by the decoder (``pipeline.video.segment_span``)."""
    if "start" not in row:
        return {}
    start, end = float(row["start"]), float(row["end"])
    if start < 0:
        raise DecodeFailure("segment_outside_video", f"segment starts at {start:g} s, before the video")
    if start >= end:
        raise DecodeFailure("segment_inverted", f"segment start {start:g} s is not before its end {end:g} s")
    return {"start": start, "end": end}


def _checked_path(root: str, rel: str) -> dict[str, Any]:
    """``root/rel`` if it stays inside ``root`` and is a non-empty file (FIFOs etc. go to the decoder).

    Symlinks are resolved first: a link (to a file or a folder) leading outside ``root`` escapes it
    just as ``..`` does. A NUL byte (no file name holds one) fails the row, not the job."""
    if "\0" in rel:
        raise DecodeFailure("invalid_path", f"{rel!r} contains a NUL byte: no file has that name")
    root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(root, rel))
    if not path.startswith(root + os.sep):
        raise DecodeFailure("path_escape", f"{rel} leads outside the media folder")
    shown = os.path.relpath(path, root)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DecodeFailure("missing_file", f"{shown} does not exist") from None
    except OSError as e:
        raise DecodeFailure("unreadable_file", f"{shown}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise DecodeFailure("not_a_file", f"{shown} is a folder")
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        raise DecodeFailure("empty_file", f"{shown} is 0 bytes")
    return {"path": path, "rel": shown}


def sampling_spec(cfg: PreprocessConfig) -> SamplingSpec:
    return SamplingSpec(
        cfg.num_frames, cfg.sampling, cfg.size, cfg.resize, cfg.required_frames, views=cfg.views
    )


def index_row(
    row: dict[str, Any], status: str, reason: str = "", message: str = "", shard: str = "", meta=None
) -> dict:
    """The row's line in ``index.parquet``; an ok row also records its frames' times (the first view's)
    and, for a segment, its ``start``/``end``, all in seconds of the source video."""
    ok = status == "ok"
    meta = meta or {}
    times = meta.get("timestamps")
    if times and isinstance(times[0], list):
        times = times[0]
    return {
        "row": row["row"],
        "videoid": None if is_missing(row.get("videoid")) else str(row["videoid"]),
        "status": status,
        "reason": reason or None,
        "message": message or None,
        "shard": shard if ok else None,
        "key": sample_key(row["row"]) if ok else None,
        "start": meta.get("start", row.get("start") if isinstance(row.get("start"), float) else None),
        "end": meta.get("end", row.get("end") if isinstance(row.get("end"), float) else None),
        "timestamps": times,
    }


_DECODERS: dict[tuple, BoundedDecoder] = {}


def shared_decoder(cfg: PreprocessConfig) -> BoundedDecoder:
    """One decoder child per Ray worker process, reused by every task the worker runs: starting
    Python + decord costs ~0.4 s, which per shard was ~10 % of a worker's time. The child exits on its
    own when the worker does (its stdin closes)."""
    key = (sampling_spec(cfg), cfg.decode_timeout_s, cfg.decode_memory_mb, cfg.decoder_recycle_every)
    if key not in _DECODERS:
        _DECODERS[key] = BoundedDecoder(*key)
    return _DECODERS[key]


def warm_worker(cfg: PreprocessConfig) -> int:
    """Ready a Ray worker process before its first work unit: Ray Data's task code imported and this
    worker's decoder child started (it imports decord while the job is still being set up)."""
    shared_decoder(cfg).start()  # first: the child imports decord while this process imports Ray Data
    import ray.data  # noqa: F401 - what a Ray Data task imports first in a fresh worker

    return os.getpid()


@dataclass(frozen=True)
class WorkUnit:
    """Rows ``lo:hi`` of one shard: the job's unit of work, smaller than a shard when the shards are
    too few to keep every core busy. A shard split into units is joined once its last unit is done,
    so each shard still appears by one atomic rename and its bytes do not depend on the split."""

    shard: int
    unit: int
    units: int
    lo: int
    hi: int
    digest: str


def shard_path(cfg: PreprocessConfig, shard: int) -> Path:
    return Path(cfg.output) / shard_name(shard, cfg.format)


def unit_path(cfg: PreprocessConfig, shard: int, unit: int) -> Path:
    """Samples of one work unit waiting to be joined (or encoded, with ``--cache-features``)."""
    name = Path(shard_name(shard, cfg.format))
    return Path(cfg.output) / STAGING_DIR / f"{name.stem}.u{unit:05d}{name.suffix}"


def unit_index_path(cfg: PreprocessConfig, shard: int, unit: int) -> Path:
    return unit_path(cfg, shard, unit).with_suffix(".parquet")


def part_path(cfg: PreprocessConfig, shard: int) -> Path:
    return Path(cfg.output) / PARTS_DIR / f"{Path(shard_name(shard, cfg.format)).stem}.parquet"


def clean_row_caption(row: dict[str, Any], cfg: PreprocessConfig) -> str:
    """The row's cleaned caption; one that cleaning leaves empty (``...``, ``(*) !!!``) is a missing one."""
    if "conversations" in row:  # instruction rows: the conversation is the text
        return ""
    caption = clean_caption(str(row["caption"]), cfg.caption)
    if not caption:
        raise DecodeFailure(
            "missing_caption", f"caption {str(row['caption'])[:60]!r} is empty after cleaning"
        )
    return caption


def prepare_row(row: dict[str, Any], cfg: PreprocessConfig) -> tuple[dict[str, Any], str]:
    """The row's media source and cleaned caption; raises ``DecodeFailure`` before any decoding."""
    source = resolve_source(row)
    caption = clean_row_caption(row, cfg)
    if cfg.is_image_dataset:
        source["image"] = True
    return source, caption


def make_sample(row: dict[str, Any], source: dict[str, Any], caption: str, clip: dict[str, Any]) -> dict:
    """A decoded row as the writer's sample."""
    frames = clip.pop("frames")
    meta = {
        "videoid": str(row["videoid"]),
        "row": row["row"],
        "caption_raw": row["caption"],
        "source": source.get("rel") or source.get("member"),
        **clip,
    }
    for extra in (
        "segment",
        "clip_span",
    ):  # a segment's place in its video's list; a video2dataset clip's span
        if extra in row:
            meta[extra] = row[extra]
    if "conversations" in row:
        meta["conversations"] = row["conversations"]
    return {"key": sample_key(row["row"]), "caption": caption, "meta": meta, "frames": frames}


def process_row(row: dict[str, Any], decoder: BoundedDecoder, cfg: PreprocessConfig) -> dict | DecodeFailure:
    """One input row -> a sample for the writer, or the failure that becomes its index row."""
    try:
        source, caption = prepare_row(row, cfg)
        clip = decoder.decode(source, [cfg.seed, row["row"]])
    except DecodeFailure as e:
        return e
    return make_sample(row, source, caption, clip)


def processed_rows(
    rows: list[dict[str, Any]], decoder: BoundedDecoder, cfg: PreprocessConfig
) -> Iterator[tuple[dict[str, Any], dict | DecodeFailure]]:
    """``process_row`` over rows, in order, with the decoder one clip ahead of the caller
    (``BoundedDecoder.decode_all``): the next clip decodes while this one is written."""
    refused: deque[tuple[dict[str, Any], DecodeFailure]] = deque()  # failed before decoding, in row order

    def requests():
        for row in rows:
            try:
                source, caption = prepare_row(row, cfg)
            except DecodeFailure as e:
                refused.append((row, e))
                continue
            yield (row, source, caption), source, [cfg.seed, row["row"]]

    for (row, source, caption), clip in decoder.decode_all(requests()):
        while refused and refused[0][0]["row"] < row["row"]:
            yield refused.popleft()
        yield row, clip if isinstance(clip, DecodeFailure) else make_sample(row, source, caption, clip)
    yield from refused


def process_rows(
    shard: int, rows: list[dict[str, Any]], dest: Path, cfg: PreprocessConfig, report=None
) -> list[dict]:
    """Decode, clean and write rows into the shard file ``dest``; returns one index row per input row.

    ``report(delta)`` is called now and then for progress (a Ray actor handle's method).
    """
    writer = ShardWriter(dest, cfg.format)
    decoder = shared_decoder(cfg)
    name = shard_name(shard, cfg.format)
    index: list[dict] = []
    pending: dict[str, Any] = {"ok": 0, "failed": 0, "reasons": {}}
    last = time.monotonic()
    try:
        for row, result in processed_rows(rows, decoder, cfg):
            if isinstance(result, DecodeFailure):
                index.append(index_row(row, "failed", result.reason, result.message))
                pending["failed"] += 1
                pending["reasons"][result.reason] = pending["reasons"].get(result.reason, 0) + 1
                pending.setdefault("examples", {}).setdefault(result.reason, result.message)
            else:
                writer.write(result)
                index.append(index_row(row, "ok", shard=name, meta=result["meta"]))
                pending["ok"] += 1
            if report is not None and time.monotonic() - last > 1.0:
                report(pending)
                pending, last = {"ok": 0, "failed": 0, "reasons": {}}, time.monotonic()
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    if report is not None:
        report(pending)
    return index


def process_unit(unit: WorkUnit, cfg: PreprocessConfig, tracker) -> bool:
    """Run one work unit; returns whether its shard is now complete and waits for the encoder.

    A whole-shard unit without the feature cache writes the final shard and its part directly.
    Otherwise the unit's samples and index go to the staging folder, and the unit that completes its
    shard (``tracker.unit_done``, a Ray actor method, says which) joins the pieces.
    """
    rows = read_shard_rows(cfg, unit.shard, unit.lo, unit.hi)
    encode = cfg.features.enabled
    if unit.units == 1 and not encode:
        index = process_rows(unit.shard, rows, shard_path(cfg, unit.shard), cfg, tracker.add.remote)
        write_part(index, part_path(cfg, unit.shard), unit.digest)
        return False
    index = process_rows(unit.shard, rows, unit_path(cfg, unit.shard, unit.unit), cfg, tracker.add.remote)
    write_parquet(
        pa.Table.from_pylist(index, schema=INDEX_SCHEMA), unit_index_path(cfg, unit.shard, unit.unit)
    )
    import ray

    last = unit.units == 1 or ray.get(tracker.unit_done.remote(unit.shard, unit.unit, unit.units))
    if last and not encode:
        finish_shard(cfg, unit.shard, unit.units, unit.digest)
    return last and encode


def staged_samples(cfg: PreprocessConfig, shard: int, units: int) -> Iterator[dict[str, Any]]:
    """A shard's samples from its staged units, in row order (a unit without ok rows has no file)."""
    for u in range(units):
        path = unit_path(cfg, shard, u)
        if path.exists():
            yield from read_shard(path)


def finish_shard(cfg: PreprocessConfig, shard: int, units: int, digest: str, transform=None) -> None:
    """Join a shard's staged units into the final shard (through ``transform(samples)`` when given,
    e.g. the feature encoder), then write its index part, the commit marker, and drop the pieces.
    Tar pieces without a transform are joined as bytes (``concat_tars``): the same file, no decoding."""
    if transform is None and cfg.format == "webdataset":
        staged = [p for u in range(units) if (p := unit_path(cfg, shard, u)).exists()]
        if staged:
            final = shard_path(cfg, shard)
            tmp = tmp_path(final)
            try:
                concat_tars(staged, tmp)
                commit(tmp, final)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    else:
        samples = staged_samples(cfg, shard, units)
        writer = ShardWriter(shard_path(cfg, shard), cfg.format)
        try:
            for sample in transform(samples) if transform is not None else samples:
                writer.write(sample)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
    parts = [pq.read_table(unit_index_path(cfg, shard, u)) for u in range(units)]
    write_part(pa.concat_tables(parts).to_pylist(), part_path(cfg, shard), digest)
    for u in range(units):
        unit_path(cfg, shard, u).unlink(missing_ok=True)
        unit_index_path(cfg, shard, u).unlink(missing_ok=True)
