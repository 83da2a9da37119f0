"""Reading WebDataset tars and stage-2 instruction sets into plain rows (WebVid CSV/TSV annotations are
streamed by ``preprocess.plan``), with clear errors before any work starts.

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

from pipeline.config import ConfigError


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


# video members of a WebDataset sample, by preference (video2dataset writes mp4 by default, webm on request)
VIDEO_MEMBERS = ("mp4", "webm", "mkv", "mov", "avi", "m4v")


def clip_span(meta: dict[str, Any]) -> list[float] | None:
    """video2dataset's ``clips: [[start, end]]`` (seconds or ``HH:MM:SS.mmm``): where a clip it cut lies in
    its source video. The clip's own timestamps start at 0 (it cuts with ``reset_timestamps``)."""
    from preprocess.corpora import parse_time

    clips = meta.get("clips")
    if not isinstance(clips, list) or len(clips) != 1:
        return None
    span = clips[0]
    try:
        start, end = (parse_time(t) for t in span)
    except (TypeError, ValueError):
        return None
    return [start, end]


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
            video = next((members[e] for e in VIDEO_MEMBERS if e in members), None)
            source = (
                {"tar": str(tpath), "offset": video.offset_data, "size": video.size, "member": video.name}
                if video is not None
                else {"error": "sample has no video member (.mp4, .webm, ...)", "reason": "missing_file"}
            )
            vid = meta.get("videoid")
            row = {
                "row": len(rows),
                "videoid": str(vid) if vid is not None else os.path.basename(key),
                "caption": caption,
                "source": source,
            }
            span = clip_span(meta)
            if span is not None:
                row["clip_span"] = span
            rows.append(row)
        if tar is not None:
            tar.close()
        if broken:
            rows.append(
                {"row": len(rows), "videoid": tpath.name, "caption": None, "source": {"error": broken}}
            )
    return rows


def is_missing(text: Any) -> bool:
    return text is None or (isinstance(text, float) and math.isnan(text)) or not str(text).strip()


# ---- stage-2 instruction sets ------------------------------------------------------------------


def _load_json(path: str, what: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"annotations: {what} file {str(p)!r} does not exist")
    try:
        return json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"annotations: {str(p)!r} is not valid JSON: {e}") from None


def _media_dir(path: str, what: str) -> str:
    if not Path(path).is_dir():
        raise ConfigError(f"{what}: {path!r} is not a folder")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ConfigError(f"{what}: folder {path!r} is not readable")
    return str(Path(path))


def _malformed(n: int, rid: Any, why: str) -> dict[str, Any]:
    return {"row": n, "videoid": None if rid is None else str(rid), "caption": None, "source": {"error": why}}


def _cc_sbu_row(n: int, rec: Any, media: str) -> dict[str, Any]:
    if not isinstance(rec, dict) or "image_id" not in rec:
        return _malformed(n, None, f"malformed record: {str(rec)[:80]}")
    iid = rec["image_id"]
    rel = f"{iid}.jpg"
    return {
        "row": n,
        "videoid": str(iid),
        "caption": rec.get("caption"),
        "source": {"media": media, "rel": rel},
    }


def _conversation(turns: Any) -> list[dict[str, str]] | None:
    """LLaVA turns ``[{from: human|gpt, value}]``, alternating and starting with the human."""
    if not isinstance(turns, list) or len(turns) < 2:
        return None
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str):
            return None
        if t.get("from") != ("human" if i % 2 == 0 else "gpt"):
            return None
        out.append({"from": t["from"], "value": t["value"]})
    return out


def _llava_row(n: int, rec: Any, media: str) -> dict[str, Any]:
    if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
        return _malformed(n, rec.get("id") if isinstance(rec, dict) else None, "malformed record: no image")
    conv = _conversation(rec.get("conversations"))
    if conv is None:
        return _malformed(n, rec.get("id"), "malformed record: conversations must alternate human/gpt")
    return {
        "row": n,
        "videoid": str(rec.get("id", rec["image"])),
        "caption": "",
        "conversations": conv,
        "source": {"media": media, "rel": rec["image"]},
    }


def _videochat_row(n: int, rec: Any, media: str) -> dict[str, Any]:
    if not isinstance(rec, dict) or not isinstance(rec.get("video"), str):
        return _malformed(n, None, "malformed record: no video")
    qa = rec.get("QA")
    if (
        not isinstance(qa, list)
        or not qa
        or not all(
            isinstance(x, dict) and isinstance(x.get("q"), str) and isinstance(x.get("a"), str) for x in qa
        )
    ):
        return _malformed(n, rec["video"], "malformed record: QA must be a non-empty list of {q, a}")
    conv = [t for x in qa for t in ({"from": "human", "value": x["q"]}, {"from": "gpt", "value": x["a"]})]
    return {
        "row": n,
        "videoid": rec["video"],
        "caption": "",
        "conversations": conv,
        "source": {"media": media, "rel": rec["video"]},
    }


def read_instructions(dataset: str, annotations: str, media: str, limit: int | None = None) -> list[dict]:
    """cc_sbu_align ``filter_cap.json``, LLaVA-Instruct JSON or VideoChat JSON -> rows.

    A record that cannot be used becomes a row whose source carries the error, so it is counted.
    """
    data = _load_json(annotations, dataset)
    media = _media_dir(media, "images" if dataset != "videochat" else "videos")
    if dataset == "cc_sbu_align":
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
            raise ConfigError(f"annotations: {annotations!r} lacks the cc_sbu_align 'annotations' list")
        records, make = data["annotations"], _cc_sbu_row
    else:
        if not isinstance(data, list):
            raise ConfigError(f"annotations: {annotations!r} must hold a JSON list of {dataset} records")
        records, make = data, (_llava_row if dataset == "llava" else _videochat_row)
    records = records if limit is None else records[:limit]
    return [make(n, rec, media) for n, rec in enumerate(records)]
