"""The preprocessing job: WebVid (CSV/TSV + videos, or WebDataset tars) -> frame shards, on Ray Data.

Single node, all cores::

    python cli.py preprocess --annotations webvid/annotations --videos webvid/videos --output shards/

Existing Ray cluster (e.g. ``slurm/preprocess.sbatch``)::

    python cli.py preprocess ... --ray-address auto

The driver reads the annotations, splits the rows into shards of ``samples_per_shard`` input rows
and hands every unfinished shard to Ray Data, which runs ``process_shard`` on one core each. A shard
is finished when its index part exists, so a rerun with the same arguments skips finished shards and
ends with the same sample set as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import ConfigError, to_dict
from pipeline.raycluster import init_ray
from pipeline.shards import (
    CONFIG_FILE,
    ENCODER_FILE,
    INDEX_FILE,
    INDEX_SCHEMA,
    PARTS_DIR,
    STAGING_DIR,
    SUMMARY_FILE,
    list_shards,
    shard_name,
    write_json,
    write_parquet,
)
from preprocess.config import PreprocessConfig
from preprocess.inputs import read_annotations, read_instructions, read_tars
from preprocess.steps import process_shard


def resolve_paths(cfg: PreprocessConfig) -> None:
    """Absolute input/output paths: Ray workers may run elsewhere, and the fingerprint must not
    depend on the directory the job was started from."""
    for name in ("annotations", "videos", "images", "tars", "output"):
        value = getattr(cfg, name)
        if value:
            setattr(cfg, name, os.path.abspath(value))


def read_rows(cfg: PreprocessConfig) -> list[dict[str, Any]]:
    if cfg.tars:
        return read_tars(cfg.tars, cfg.limit)
    if cfg.dataset == "webvid":
        return read_annotations(cfg.annotations, cfg.videos, cfg.limit)
    media = cfg.images if cfg.is_image_dataset else cfg.videos
    return read_instructions(cfg.dataset, cfg.annotations, media, cfg.limit)


def check_output(cfg: PreprocessConfig) -> None:
    """Refuse an output folder that holds another config's shards (a resume must match exactly)."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output: {cfg.output!r} exists and is not a folder")
    marker = out / CONFIG_FILE
    if marker.exists():
        theirs = json.loads(marker.read_text())
        if theirs.get("fingerprint") != cfg.output_fingerprint():
            diff = {
                k: (v, to_dict(cfg).get(k))
                for k, v in theirs.get("config", {}).items()
                if k not in ("workers", "ray_address", "progress_every_s", "object_store_mb")
                and to_dict(cfg).get(k) != v
            }
            raise ConfigError(
                f"output: {cfg.output!r} holds shards written with another config (differs in: "
                f"{', '.join(f'{k}: {a!r} there vs {b!r} now' for k, (a, b) in diff.items()) or 'inputs'}); "
                "use a new output folder or the same arguments"
            )
    elif out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"output: {cfg.output!r} is not empty and was not written by this job")


def plan_shards(rows: list[dict[str, Any]], per_shard: int) -> list[tuple[int, list[dict[str, Any]]]]:
    return [(i // per_shard, rows[i : i + per_shard]) for i in range(0, len(rows), per_shard)]


def _finished(out: Path, shard: int, fmt: str) -> list[dict] | None:
    part = out / PARTS_DIR / f"{Path(shard_name(shard, fmt)).stem}.parquet"
    if part.exists() and (out / shard_name(shard, fmt)).exists():
        return pq.read_table(part).to_pylist()
    return None


class _Progress:
    """Counts clips across shard tasks (a Ray actor) so the driver can print per-clip progress."""

    def __init__(self):
        self.ok, self.failed, self.reasons = 0, 0, Counter()

    def add(self, delta: dict) -> None:
        self.ok += delta["ok"]
        self.failed += delta["failed"]
        self.reasons.update(delta["reasons"])

    def get(self) -> tuple[int, int, dict]:
        return self.ok, self.failed, dict(self.reasons)


def _print_progress(done: int, failed: int, total: int, t0: float, reasons: dict) -> None:
    rate = done / max(time.monotonic() - t0, 1e-9)
    top = ", ".join(f"{k}={v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
    print(
        f"[preprocess] {done}/{total} clips  {rate:.1f} clips/s  failed {failed}"
        + (f" ({top})" if top else ""),
        flush=True,
    )


def run(cfg: PreprocessConfig) -> dict[str, Any]:
    """Run the job; returns the summary (also written to ``OUTPUT/summary.json``)."""
    import ray

    t_start = time.monotonic()
    resolve_paths(cfg)
    check_output(cfg)
    rows = read_rows(cfg)
    out = Path(cfg.output)
    (out / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    (out / STAGING_DIR).mkdir(exist_ok=True)
    for stale in [
        *out.glob(".*.tmp-*"),
        *(out / PARTS_DIR).glob(".*.tmp-*"),
        *(out / STAGING_DIR).glob(".*.tmp-*"),
    ]:
        stale.unlink()  # left by a killed run; final names are only ever complete files
    write_json({"fingerprint": cfg.output_fingerprint(), "config": to_dict(cfg)}, out / CONFIG_FILE)

    shards = plan_shards(rows, cfg.samples_per_shard)
    results: dict[int, list[dict]] = {}
    todo = []
    for shard, shard_rows in shards:
        done = _finished(out, shard, cfg.format)
        if done is not None and len(done) == len(shard_rows):
            results[shard] = done
        else:
            todo.append((shard, shard_rows))
    resumed = sum(len(v) for v in results.values())
    print(
        f"[preprocess] {len(rows)} input rows in {len(shards)} shards; {len(shards) - len(todo)} shards "
        f"({resumed} rows) already done; {len(todo)} to do",
        flush=True,
    )

    t_work = time.monotonic()
    if todo:
        owns_ray = init_ray(cfg.ray_address, cfg.workers, cfg.object_store_mb)
        try:
            _run_shards(cfg, todo, results, len(rows) - resumed)
        finally:
            if owns_ray:
                ray.shutdown()
    work_s = time.monotonic() - t_work
    return _finish(cfg, rows, results, shards, resumed, work_s, time.monotonic() - t_start)


def _run_shards(cfg: PreprocessConfig, todo: list, results: dict, total: int) -> None:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.verbose_stats_logs = False
    progress = ray.remote(num_cpus=0)(_Progress).remote()

    def shard_task(item: dict[str, Any]) -> dict[str, Any]:
        t0 = time.monotonic()
        index = process_shard(item["shard"], json.loads(item["rows"]), cfg, report=progress.add.remote)
        return {"shard": item["shard"], "index": json.dumps(index), "seconds": time.monotonic() - t0}

    items = [{"shard": s, "rows": json.dumps(r)} for s, r in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map(shard_task, num_cpus=1)
    if cfg.features.enabled:
        from preprocess.features import ShardEncoder

        fc = cfg.features
        gpus = fc.num_gpus if fc.num_gpus is not None else (1 if ray.cluster_resources().get("GPU") else 0)
        ds = ds.map_batches(
            ShardEncoder,
            fn_constructor_args=(cfg,),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=fc.concurrency),
            num_gpus=gpus,
            num_cpus=fc.num_cpus,
        )
    stop = threading.Event()
    t0 = time.monotonic()

    def report_loop() -> None:
        while not stop.wait(cfg.progress_every_s):
            ok, failed, reasons = ray.get(progress.get.remote())
            _print_progress(ok + failed, failed, total, t0, reasons)

    reporter = threading.Thread(target=report_loop, daemon=True)
    reporter.start()
    try:
        for rec in ds.iter_rows():
            results[rec["shard"]] = json.loads(rec["index"])
            if "encoder" in rec:
                _check_encoder(cfg, str(rec["encoder"]))
    finally:
        stop.set()
        reporter.join()
    ok, failed, reasons = ray.get(progress.get.remote())
    _print_progress(ok + failed, failed, total, t0, reasons)


def _check_encoder(cfg: PreprocessConfig, identity: str) -> None:
    """All feature shards of one output folder come from one encoder (config and weights)."""
    path = Path(cfg.output) / ENCODER_FILE
    if path.exists():
        known = json.loads(path.read_text())["encoder"]
        if known != identity:
            raise RuntimeError(
                f"feature encoder {identity} differs from {known}, which wrote this folder's other shards "
                "(were the weight files changed?); use a new output folder"
            )
    else:
        write_json({"encoder": identity}, path)


def _finish(cfg, rows, results, shards, resumed, work_s, total_s) -> dict[str, Any]:
    out = Path(cfg.output)
    index = [r for s, _ in shards for r in results[s]]
    if len(index) != len(rows) or [r["row"] for r in index] != list(range(len(rows))):
        raise RuntimeError(f"internal error: {len(index)} index rows for {len(rows)} input rows")
    write_parquet(pa.Table.from_pylist(index, schema=INDEX_SCHEMA), out / INDEX_FILE)
    failures = Counter(r["reason"] for r in index if r["status"] == "failed")
    ok = sum(r["status"] == "ok" for r in index)
    processed = len(rows) - resumed
    summary = {
        "total": len(rows),
        "ok": ok,
        "failed": len(rows) - ok,
        "failures": dict(sorted(failures.items())),
        "shards": [p.name for p in list_shards(out)],
        "format": cfg.format,
        "resumed_rows": resumed,
        "seconds": round(total_s, 3),
        "work_seconds": round(work_s, 3),
        "clips_per_s": round(processed / work_s, 3) if processed and work_s > 0 else None,
        "fingerprint": cfg.output_fingerprint(),
        "encoder": json.loads((out / ENCODER_FILE).read_text())["encoder"] if cfg.features.enabled else None,
        "config": to_dict(cfg),
    }
    write_json(summary, out / SUMMARY_FILE)
    return summary


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"preprocess: {s['ok']}/{s['total']} ok, {s['failed']} failed -> {s['config']['output']}",
        f"  shards: {len(s['shards'])} x {s['format']}   time: {s['seconds']:.1f} s"
        + (f"   throughput: {s['clips_per_s']:.2f} clips/s" if s["clips_per_s"] else "")
        + (f"   resumed: {s['resumed_rows']} rows" if s["resumed_rows"] else ""),
    ]
    for reason, n in s["failures"].items():
        lines.append(f"  failed {reason}: {n}")
    lines.append("  per-row status: index.parquet; details: summary.json")
    return "\n".join(lines)
