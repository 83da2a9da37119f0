"""Reading the job's input into plain rows, with clear errors before any work starts.

A row is ``{"row", "videoid", "caption", "source"}`` plus, for WebVid annotations, ``page_dir``.
``source`` says where the video bytes are: ``{"path"}`` or, for a tar member, ``{"tar", "offset",
"size"}``. Rows keep input order (files sorted by name), so row numbers, keys and shards are the
same on every run.
"""

from __future__ import annotations

import json
import math
import os
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv

from pipeline.config import ConfigError

WEBVID_COLUMNS = ("videoid", "page_dir", "name")


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


def _read_table(path: Path) -> pa.Table:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        header = pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            read_options=pacsv.ReadOptions(block_size=1 << 16),
        ).schema.names
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(f"annotations: cannot parse {str(path)!r}: {e}") from None
    missing = [c for c in WEBVID_COLUMNS if c not in header]
    if missing:
        raise ConfigError(
            f"annotations: {str(path)!r} lacks column(s) {', '.join(missing)} (has: {', '.join(header)}); "
            f"WebVid annotations need {', '.join(WEBVID_COLUMNS)}"
        )
    convert = pacsv.ConvertOptions(
        column_types={c: pa.string() for c in WEBVID_COLUMNS},
        include_columns=list(WEBVID_COLUMNS),
        strings_can_be_null=True,
        null_values=["", "NaN", "nan", "NULL", "null", "None"],
    )
    try:
        return pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            convert_options=convert,
        )
    except pa.ArrowInvalid as e:
        raise ConfigError(f"annotations: cannot parse {str(path)!r}: {e}") from None


def read_annotations(annotations: str, videos: str, limit: int | None = None) -> list[dict[str, Any]]:
    """All rows of a WebVid CSV/TSV file or folder of them, with each row's video path."""
    vdir = Path(videos)
    if not vdir.is_dir():
        raise ConfigError(f"videos: {str(vdir)!r} is not a folder")
    if not os.access(vdir, os.R_OK | os.X_OK):
        raise ConfigError(f"videos: folder {str(vdir)!r} is not readable")
    rows: list[dict[str, Any]] = []
    for f in annotation_files(annotations):
        for r in _read_table(f).to_pylist():
            if limit is not None and len(rows) >= limit:
                return rows
            rows.append(
                {
                    "row": len(rows),
                    "videoid": r["videoid"],
                    "page_dir": r["page_dir"],
                    "caption": r["name"],
                    "source": {"videos": str(vdir), "page_dir": r["page_dir"], "videoid": r["videoid"]},
                }
            )
    return rows


def _caption_from(members: dict[str, tarfile.TarInfo], tar: tarfile.TarFile) -> tuple[str | None, dict]:
    """WebVid mirrors keep the caption in KEY.json (``caption``/``name``/``text``) or KEY.txt."""
    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            meta = json.loads(tar.extractfile(members["json"]).read())
        except (ValueError, UnicodeDecodeError, tarfile.TarError, OSError):
            meta = {}
        if not isinstance(meta, dict):
            meta = {}
        for k in ("caption", "name", "text", "txt"):
            if isinstance(meta.get(k), str):
                return meta[k], meta
    if "txt" in members:
        try:
            return tar.extractfile(members["txt"]).read().decode("utf-8", "replace"), meta
        except (tarfile.TarError, OSError):
            return None, meta
    return None, meta


def read_tars(folder: str, limit: int | None = None) -> list[dict[str, Any]]:
    """One row per sample key in a folder of WebDataset tars (sorted), video bytes located by offset."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"tars: {str(root)!r} is not a folder")
    tars = sorted(root.glob("*.tar"))
    if not tars:
        raise ConfigError(f"tars: no .tar files in {str(root)!r}")
    rows: list[dict[str, Any]] = []
    for tpath in tars:
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        broken, tar = None, None
        try:
            tar = tarfile.open(tpath, "r:")  # noqa: SIM115 - closed below, after captions are read
            for m in tar:  # headers only: tarfile seeks over the member data
                if m.isfile():
                    base = os.path.basename(m.name)
                    key, _, ext = base.partition(".")
                    groups.setdefault(os.path.join(os.path.dirname(m.name), key), {})[ext.lower()] = m
        except (tarfile.TarError, OSError) as e:  # keep what was listed, account for the rest
            broken = f"unreadable tar {tpath.name}: {e}"
        for key, members in groups.items():
            if limit is not None and len(rows) >= limit:
                return rows
            caption, meta = _caption_from(members, tar) if tar is not None else (None, {})
            video = members.get("mp4")
            source = (
                {"tar": str(tpath), "offset": video.offset_data, "size": video.size, "member": video.name}
                if video is not None
                else {"error": "sample has no .mp4 member"}
            )
            vid = meta.get("videoid")
            rows.append(
                {
                    "row": len(rows),
                    "videoid": str(vid) if vid is not None else os.path.basename(key),
                    "caption": caption,
                    "source": source,
                }
            )
        if tar is not None:
            tar.close()
        if broken:
            rows.append(
                {"row": len(rows), "videoid": tpath.name, "caption": None, "source": {"error": broken}}
            )
    return rows


def is_missing(text: Any) -> bool:
    return text is None or (isinstance(text, float) and math.isnan(text)) or not str(text).strip()
