"""The shard format shared by preprocessing (writer) and training / evaluation (readers).

A shard set is a folder::

    _config.json              fingerprint + resolved config of the job that wrote it
    _encoder.json             with cached features: identity of the encoder (config + weights hash)
    shard-000000.tar          --format webdataset: per sample KEY.frames.npy (uint8 [T,H,W,3]),
    shard-000001.tar            KEY.txt (caption), KEY.json (metadata); KEY.features.npy when cached
                                (float16 [T,32,D]; with views=K frames/features gain a leading K axis)
    shard-000000.arrow        --format arrow: Arrow IPC file, one row per sample (same fields)
    _parts/shard-000000.parquet   index rows of that shard (written last: the shard's commit marker)
    _staging/                 while running: pieces of shards (work units) waiting to be joined or
                                encoded; removed when the job ends
    _plan.arrow               while running: the input rows, one record batch per shard
    index.parquet             one row per input row: videoid, status, reason, shard, key, start, end
                                (a segment, seconds), timestamps (an ok row's frame times, source time)
    summary.json              totals, failures by reason, config, timing

Every file appears by rename from a temporary name, so a reader never sees half a shard. A shard with
no ok sample has no shard file (its index part still accounts for its rows). Each index part carries
the digest of the input rows its shard was made from (``rows_digest`` in the Parquet metadata): a
rerun reuses a shard only when its rows are unchanged.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import ConfigError

if TYPE_CHECKING:
    from pipeline.model import ModelConfig

CONFIG_FILE = "_config.json"
ENCODER_FILE = "_encoder.json"  # with cached features: the encoder (config + weights hash) that made them
PARTS_DIR = "_parts"
STAGING_DIR = "_staging"  # work units waiting to be joined into a shard or encoded
PLAN_FILE = "_plan.arrow"  # the job's input rows while it runs, one record batch per shard
PART_DIGEST_KEY = b"rows_digest"  # index-part metadata: digest of the shard's input rows
INDEX_FILE = "index.parquet"
SUMMARY_FILE = "summary.json"
EXTENSIONS = {"webdataset": ".tar", "arrow": ".arrow"}
# Rank of one sample's array per input kind: frames [T,H,W,3], features [T,Q,D]; one more = a leading
# views axis (preprocess --views K).
SAMPLE_NDIM = {"frames": 4, "features": 3}
INDEX_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("videoid", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
        ("shard", pa.string()),
        ("key", pa.string()),
        # seconds in the source video: a segment's span, an ok row's sampled frame times (first view)
        ("start", pa.float64()),
        ("end", pa.float64()),
        ("timestamps", pa.list_(pa.float64())),
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


class TarWriter:
    """The bytes ``webdataset.TarWriter(path, mtime=0.0, encoder=False)`` writes (members of a sample in
    sorted order, ``KEY.EXT``, mode 0o444, owner ``bigdata``, mtime 0, a streamed tar), without importing
    webdataset, which imports torch: 1.2 s or more in every fresh Ray worker of a preprocessing job."""

    def __init__(self, path: str | Path):
        import tarfile

        self._tarfile = tarfile
        self._file = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._tar = tarfile.open(fileobj=self._file, mode="w|")  # noqa: SIM115

    def write(self, entry: dict[str, Any]) -> None:
        key = entry["__key__"]
        for ext in sorted(k for k in entry if k != "__key__"):
            data = entry[ext]
            info = self._tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0.0, 0o0444
            info.uname = info.gname = "bigdata"
            self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            self._tar.close()
        finally:
            self._file.close()


def concat_tars(sources: list[Path], dest: Path) -> int:
    """Write to ``dest`` the tar that one ``TarWriter`` fed the members of ``sources`` in order would
    have written, by copying bytes: each source's member blocks (headers and padded data, up to its
    end-of-archive marker), then the marker and the record padding ``tarfile`` ends a stream with.
    No member is decoded, so joining a shard's pieces costs a file copy. Returns the member count."""
    import tarfile

    written, members = 0, 0
    with open(dest, "wb") as out:
        for src in sources:
            with tarfile.open(src, "r:") as tar:
                members += len(tar.getmembers())
                end = tar.offset  # after the last member's padded data
            with open(src, "rb") as f:
                left = end
                while left:
                    chunk = f.read(min(left, 1 << 20))
                    if not chunk:
                        raise ValueError(f"{src}: ends inside its members")
                    out.write(chunk)
                    left -= len(chunk)
            written += end
        tail = 2 * tarfile.BLOCKSIZE
        tail += -(written + tail) % tarfile.RECORDSIZE
        out.write(bytes(tail))
    return members


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
            self._tar = TarWriter(self.tmp)
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

    def commit(self) -> bool:
        """Publish the shard; one without samples is not written at all. Returns whether it was."""
        if self.count == 0:
            self.abort()
            return False
        if self.fmt == "webdataset":
            self._tar.close()
        else:
            self._flush_arrow()
            self._arrow.close()
        commit(self.tmp, self.final)
        return True

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


def write_part(index: list[dict[str, Any]], final: Path, digest: str) -> None:
    """A shard's index part (its commit marker), stamped with the digest of its input rows."""
    table = pa.Table.from_pylist(index, schema=INDEX_SCHEMA)
    write_parquet(table.replace_schema_metadata({PART_DIGEST_KEY: digest.encode()}), final)


def part_digest(path: Path) -> str | None:
    """The input-rows digest an index part was written for (None: unreadable or written before digests)."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    value = meta.get(PART_DIGEST_KEY)
    return value.decode() if value else None


def write_json(data: Any, final: Path) -> None:
    tmp = tmp_path(final)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    commit(tmp, final)


# ---- readers ---------------------------------------------------------------------------------------


def unfinished_output(folder: str | Path) -> str | None:
    """Why ``folder`` is the output of a preprocess job that has not finished (killed, crashed, or still
    running), else None. A finished job removes its plan and staging area and writes the index and the
    summary last; a folder of shards not written by the job (no config marker) is taken as it is."""
    folder = Path(folder)
    left = [n for n in (PLAN_FILE, STAGING_DIR) if (folder / n).exists()]
    missing = [n for n in (INDEX_FILE, SUMMARY_FILE) if not (folder / n).is_file()]
    if not left and not ((folder / CONFIG_FILE).is_file() and missing):
        return None
    return ", ".join([f"{n} present" for n in left] + [f"no {n}" for n in missing])


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
        yield _tar_sample(s["__key__"], s)


def _tar_sample(key: str, files: dict[str, bytes]) -> dict[str, Any]:
    sample = {"key": key, "caption": files["txt"].decode(), "meta": json.loads(files["json"])}
    for n in ("frames", "features"):
        if f"{n}.npy" in files:
            sample[n] = np.load(io.BytesIO(files[f"{n}.npy"]), allow_pickle=False)
    return sample


class ShardFile:
    """Random access to one shard's samples: ``shard.sample(i)`` reads sample ``i`` alone (the same dict
    as :func:`read_shard` yields). Arrow: the record batch holding it, memory-mapped. Tar: an index of
    member offsets made once from the headers (the data is seeked over), then one seek per member, grouped
    by key as webdataset groups them (the file name up to its first dot). A sample past a damaged part
    raises ``tarfile.ReadError``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._error: str | None = None
        if self.path.suffix == ".arrow":
            self._src = pa.memory_map(str(self.path))
            self._reader = pa.ipc.open_file(self._src)
            rows = [self._reader.get_batch(i).num_rows for i in range(self._reader.num_record_batches)]
            self._starts = np.cumsum([0, *rows])
            self._n = int(self._starts[-1])
            return
        import tarfile

        self._samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
        size = self.path.stat().st_size
        try:
            with tarfile.open(self.path, "r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    folder, _, name = m.name.rpartition("/")
                    base, _, ext = name.partition(".")
                    key = f"{folder}/{base}" if folder else base
                    if not self._samples or self._samples[-1][0] != key:
                        self._samples.append((key, {}))
                    self._samples[-1][1][ext] = (m.offset_data, m.size)
        except tarfile.TarError as e:
            self._error = str(e) or "unreadable tar"
        if self._samples and any(o + n > size for o, n in self._samples[-1][1].values()):
            self._samples.pop()  # its data is cut short
            self._error = self._error or "unexpected end of data"
        self._n = len(self._samples)
        self._file = open(self.path, "rb")  # noqa: SIM115 (kept open for the reads; closed in close())

    def __len__(self) -> int:
        return self._n

    def sample(self, i: int) -> dict[str, Any]:
        if i >= self._n:
            import tarfile

            raise tarfile.ReadError(self._error or f"{self.path.name} holds {self._n} samples, not {i + 1}")
        if self.path.suffix == ".arrow":
            b = int(np.searchsorted(self._starts, i, side="right")) - 1
            row = self._reader.get_batch(b).slice(i - int(self._starts[b]), 1)
            sample = {
                "key": row.column("key")[0].as_py(),
                "caption": row.column("caption")[0].as_py(),
                "meta": json.loads(row.column("meta")[0].as_py()),
            }
            for n in ("frames", "features"):
                if n in row.schema.names:
                    sample[n] = row.column(n).to_numpy_ndarray()[0]
            return sample
        key, members = self._samples[i]
        files = {}
        for ext, (offset, size) in members.items():
            self._file.seek(offset)
            files[ext] = self._file.read(size)
        return _tar_sample(key, files)

    def close(self) -> None:
        if self.path.suffix == ".arrow":
            self._src.close()
        else:
            self._file.close()


def first_view(x: np.ndarray, kind: str) -> np.ndarray:
    """A sample's ``frames`` / ``features`` without the views axis (the first view when it has several)."""
    return x if x.ndim == SAMPLE_NDIM[kind] else x[0]


# ---- shard sets: what a folder holds, and whether it fits a model --------------------------------


@dataclass(frozen=True)
class WrittenConfig:
    """A shard folder's ``_config.json``: the fingerprint and the resolved preprocessing config of the
    job that wrote it, with typed access to what the readers check."""

    fingerprint: str | None
    config: dict[str, Any]

    @property
    def num_frames(self) -> int | None:
        return self.config.get("num_frames")

    @property
    def size(self) -> int | None:
        return self.config.get("size")

    @property
    def features(self) -> dict[str, Any]:
        """The feature-cache settings (``enabled``, the encoder's weight paths, ...); {} without any."""
        return self.config.get("features") or {}


def read_shard_config(folder: str | Path) -> WrittenConfig | None:
    """The folder's ``_config.json``, or None when no job wrote one (a hand-made or older shard set)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{str(path)!r} is not valid JSON ({e}); remove it or rerun the job") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{str(path)!r} holds {type(data).__name__}, expected an object")
    return WrittenConfig(data.get("fingerprint"), data.get("config") or {})


@dataclass(frozen=True)
class ShardSet:
    """What a shard folder holds, read from its first sample and its config files."""

    folder: Path
    kind: str  # the input the reader will use: "frames" or "features"
    num_frames: int  # T per clip
    encoder: str | None  # "<config fingerprint>-<weights hash>" of the encoder that cached the features


def _first_sample(folder: Path) -> dict[str, Any] | None:
    for path in list_shards(folder):
        for sample in read_shard(path):
            return sample
    return None


def _cached_encoder(folder: Path, sample: dict[str, Any]) -> str | None:
    if (folder / ENCODER_FILE).is_file():
        return json.loads((folder / ENCODER_FILE).read_text())["encoder"]
    return sample["meta"].get("encoder")


def _hint(t: int) -> str:
    return " (images are 1-frame clips: give that data.datasets entry num_frames: 1)" if t == 1 else ""


def inspect_shards(
    folder: str | Path,
    want: str = "auto",
    num_frames: int | None = None,
    mcfg: ModelConfig | None = None,
    key: str = "data.num_frames",
    setting: str = "data",
) -> ShardSet:
    """Describe a shard set and refuse one that does not fit: ``want`` ("auto": features when cached),
    ``num_frames`` (None: whatever the shards hold) and, with ``mcfg``, the model's image size, feature
    shape and encoder fingerprint. ``key`` names the setting that gave ``num_frames`` and ``setting`` the
    one that gave ``folder``, so a message points at what to change."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{setting}: shard folder {str(folder)!r} does not exist")
    sample = _first_sample(folder)
    if sample is None:
        raise ConfigError(f"{setting}: {str(folder)!r} holds no samples")
    has_features = sample.get("features") is not None
    kind = ("features" if has_features else "frames") if want == "auto" else want
    where = f"shards in {str(folder)!r}"
    if kind == "features" and not has_features:
        raise ConfigError(f"data.input=features but the {where} hold frames, not cached features")
    if kind == "frames" and sample.get("frames") is None:
        raise ConfigError(f"data.input=frames but the {where} hold only cached features")
    t = sample[kind].shape[-SAMPLE_NDIM[kind]]
    encoder = _cached_encoder(folder, sample) if kind == "features" else None
    shards = ShardSet(folder, kind, t, encoder)
    want_t = t if num_frames is None else num_frames
    if kind == "frames":
        _check_frames(sample["frames"], read_shard_config(folder), want_t, mcfg, key, where)
    else:
        _check_features(sample["features"], encoder, want_t, mcfg, key, where)
    return shards


def _check_frames(
    x: np.ndarray, written: WrittenConfig | None, num_frames: int, mcfg, key: str, where: str
) -> None:
    t, h, w, c = x.shape[-4:]
    wrote_t = written.num_frames if written and written.num_frames is not None else t
    if t != num_frames or (t > 1 and wrote_t != num_frames):
        raise ConfigError(f"{key} is {num_frames} but the {where} hold {t} frames per clip{_hint(t)}")
    if mcfg is not None:
        size = mcfg.image_size
        wrote_size = written.size if written and written.size is not None else size
        if (h, w) != (size, size) or wrote_size != size:
            raise ConfigError(
                f"model.image_size is {size} but the {where} hold {h}x{w} frames "
                f"(preprocess with --size {size} or change the model)"
            )
    if c != 3:
        raise ConfigError(f"the {where} hold frames with {c} channels, expected 3 (RGB)")


def _check_features(x: np.ndarray, encoder: str | None, num_frames: int, mcfg, key: str, where: str) -> None:
    t, q, d = x.shape[-3:]
    if t != num_frames:
        raise ConfigError(f"{key} is {num_frames} but the {where} hold features of {t} frames{_hint(t)}")
    if mcfg is None:
        return
    if (q, d) != (mcfg.num_query_tokens, mcfg.feature_dim):
        raise ConfigError(
            f"the {where} hold features [T,{q},{d}] but the model expects "
            f"[T,{mcfg.num_query_tokens},{mcfg.feature_dim}] (num_query_tokens, feature_dim)"
        )
    theirs = encoder.split("-")[0] if encoder else None
    if theirs and theirs != mcfg.encoder_fingerprint():
        raise ConfigError(
            f"the {where} were cached with another frozen encoder (fingerprint {theirs}, this model "
            f"{mcfg.encoder_fingerprint()}): rebuild the feature cache or use the same encoder config"
        )


def batches(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of ``size`` items (the last may be shorter); itertools.batched needs 3.12."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
