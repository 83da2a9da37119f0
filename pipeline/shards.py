"""The shard format shared by preprocessing (writer) and training / evaluation (readers).

A shard set is a folder::

    _config.json              fingerprint + resolved config of the job that wrote it
    _encoder.json             with cached features: identity of the encoder (config + weights hash)
    shard-000000.tar          --format webdataset: per sample KEY.frames.npy (uint8 [T,H,W,3]),
    shard-000001.tar            KEY.txt (caption), KEY.json (metadata); KEY.features.npy when cached
                                (float16 [T,32,D]; with views=K frames/features gain a leading K axis)
    shard-000000.arrow        --format arrow: Arrow IPC file, one row per sample (same fields)
    _parts/shard-000000.parquet   index rows of that shard (written last: the shard's commit marker)
    _staging/                 with --cache-features: frame shards waiting for the encoder
    index.parquet             one row per input row: videoid, status, reason, shard, key
    summary.json              totals, failures by reason, config, timing

Every file appears by rename from a temporary name, so a reader never sees half a shard.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CONFIG_FILE = "_config.json"
ENCODER_FILE = "_encoder.json"  # with cached features: the encoder (config + weights hash) that made them
PARTS_DIR = "_parts"
STAGING_DIR = "_staging"  # frame shards waiting for the feature encoder
INDEX_FILE = "index.parquet"
SUMMARY_FILE = "summary.json"
EXTENSIONS = {"webdataset": ".tar", "arrow": ".arrow"}
INDEX_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("videoid", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
        ("shard", pa.string()),
        ("key", pa.string()),
    ]
)


def shard_name(shard: int, fmt: str) -> str:
    return f"shard-{shard:06d}{EXTENSIONS[fmt]}"


def sample_key(row: int) -> str:
    """Keys are the input row number: deterministic, unique, and free of dots (webdataset splits on them)."""
    return f"{row:09d}"


def tmp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")


def commit(tmp: Path, final: Path) -> None:
    """fsync then atomic rename: the final name only ever holds a complete file."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


class ShardWriter:
    """Streams samples into one shard under a temporary name; ``commit()`` publishes it.

    A sample is ``{"key", "caption", "meta": dict, "frames": uint8 [T,H,W,3] | None,
    "features": float16 [T,32,D] | None}``.
    """

    def __init__(self, final: str | Path, fmt: str):
        self.final, self.fmt = Path(final), fmt
        self.tmp = tmp_path(self.final)
        self.count = 0
        if fmt == "webdataset":
            import webdataset as wds

            self._tar = wds.TarWriter(str(self.tmp), mtime=0.0, encoder=False)
        else:
            self._rows: list[dict[str, Any]] = []
            self._arrow = None

    def write(self, sample: dict[str, Any]) -> None:
        self.count += 1
        if self.fmt == "webdataset":
            entry = {
                "__key__": sample["key"],
                "txt": sample["caption"].encode(),
                "json": json.dumps(sample["meta"], sort_keys=True).encode(),
            }
            for name in ("frames", "features"):
                if sample.get(name) is not None:
                    entry[f"{name}.npy"] = _npy_bytes(sample[name])
            self._tar.write(entry)
            return
        self._rows.append(sample)
        if len(self._rows) >= 16:
            self._flush_arrow()

    def _flush_arrow(self) -> None:
        if not self._rows:
            return
        cols: dict[str, Any] = {
            "key": [s["key"] for s in self._rows],
            "caption": [s["caption"] for s in self._rows],
            "meta": [json.dumps(s["meta"], sort_keys=True) for s in self._rows],
        }
        for name in ("frames", "features"):
            if self._rows[0].get(name) is not None:
                arr = np.stack([s[name] for s in self._rows])
                cols[name] = pa.FixedShapeTensorArray.from_numpy_ndarray(arr)
        batch = pa.RecordBatch.from_pydict(cols)
        if self._arrow is None:
            self._arrow = pa.ipc.new_file(str(self.tmp), batch.schema)
        self._arrow.write_batch(batch)
        self._rows = []

    def commit(self) -> None:
        if self.fmt == "webdataset":
            self._tar.close()
        else:
            self._flush_arrow()
            if self._arrow is None:  # no ok sample: still a valid, empty file
                schema = pa.schema([("key", pa.string()), ("caption", pa.string()), ("meta", pa.string())])
                self._arrow = pa.ipc.new_file(str(self.tmp), schema)
            self._arrow.close()
        commit(self.tmp, self.final)

    def abort(self) -> None:
        try:
            if self.fmt == "webdataset":
                self._tar.close()
            elif self._arrow is not None:
                self._arrow.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def write_parquet(table: pa.Table, final: Path) -> None:
    tmp = tmp_path(final)
    pq.write_table(table, tmp)
    commit(tmp, final)


def write_json(data: Any, final: Path) -> None:
    tmp = tmp_path(final)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    commit(tmp, final)


# ---- readers ---------------------------------------------------------------------------------------


def list_shards(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return sorted(
        p for p in folder.iterdir() if p.name.startswith("shard-") and p.suffix in (".tar", ".arrow")
    )


def read_shard(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield samples of one shard (either format) as ``{"key", "caption", "meta", "frames"?, "features"?}``."""
    path = Path(path)
    if path.suffix == ".arrow":
        with pa.memory_map(str(path)) as src:
            reader = pa.ipc.open_file(src)
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                arrays = {
                    n: batch.column(n).to_numpy_ndarray()
                    for n in ("frames", "features")
                    if n in batch.schema.names
                }
                for j in range(batch.num_rows):
                    sample = {
                        "key": batch.column("key")[j].as_py(),
                        "caption": batch.column("caption")[j].as_py(),
                        "meta": json.loads(batch.column("meta")[j].as_py()),
                    }
                    sample.update({n: a[j] for n, a in arrays.items()})
                    yield sample
        return
    import webdataset as wds

    # one named shard: no node/worker splitting (callers split shard lists themselves)
    dataset = wds.WebDataset(
        str(path), shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None
    )
    for s in dataset:
        sample = {"key": s["__key__"], "caption": s["txt"].decode(), "meta": json.loads(s["json"])}
        for n in ("frames", "features"):
            if f"{n}.npy" in s:
                sample[n] = np.load(io.BytesIO(s[f"{n}.npy"]), allow_pickle=False)
        yield sample
