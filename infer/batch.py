"""Batch captioning of a preprocessed shard set with a Ray actor pool, written to JSONL, resumable.

    python cli.py caption-shards runs/stage1 SHARDS --output captions.jsonl --greedy
    python cli.py caption-shards runs/stage1 SHARDS --output captions.jsonl --concurrency 8   # 8 GPUs
    python cli.py caption-shards ... --ray-address auto        # an existing cluster (slurm/preprocess.sbatch)

Ray Data ``map_batches`` runs :class:`ShardCaptioner` (a callable class: each actor loads the model once,
one GPU per actor when the cluster has GPUs) over the list of shards; it reads frames or cached features
and yields ``{"key", "videoid", "caption", "shard"}`` lines every ``generation.batch_size`` clips. The
driver alone appends to OUT.jsonl (flushed per batch), so:

* a rerun skips every key already in the file; a half-written last line from a killed run is dropped;
  shards whose keys are all there are not even scheduled;
* no key is ever written twice (the driver checks, so a retried Ray task cannot duplicate either);
* rows that fail (unreadable shard, malformed sample) are reported in the summary, not written, so the
  next run retries them; rows the preprocessing job failed come from ``index.parquet``.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from infer.load import ModelSource, check_llm, resolve
from pipeline.config import ConfigError, check_writable
from pipeline.generate import GenerationConfig, caption_features
from pipeline.raycluster import init_ray, quiet_actor_restart_warning, shutdown_ray
from pipeline.shards import INDEX_FILE, SAMPLE_NDIM, inspect_shards, list_shards, read_shard


@dataclass
class BatchCaptionConfig:
    model: ModelSource = field(default_factory=ModelSource)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    shards: str = ""
    output: str = ""
    input: Literal["auto", "frames", "features"] = "auto"  # auto: cached features when present
    concurrency: int = 1  # captioning actors (one model each)
    num_gpus: float | None = None  # per actor; default 1 when the Ray cluster has GPUs, else 0
    num_cpus: float = 1.0  # per actor
    workers: int | None = None  # CPUs of the local Ray instance (default: all cores)
    ray_address: str | None = None  # join an existing cluster instead, e.g. "auto"

    def validate(self) -> None:
        if not self.shards or not self.output:
            raise ConfigError("shards and output are required")
        if self.concurrency < 1:
            raise ConfigError("concurrency: must be >= 1")


# ---- the output file -----------------------------------------------------------------------------


def read_done(path: Path) -> dict[str, set[str]]:
    """Keys already captioned, by shard name; a torn last line (killed mid-write) is cut off the file."""
    done: dict[str, set[str]] = {}
    if not path.is_file():
        return done
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "rb+") as f:
            f.truncate(data.rfind(b"\n") + 1)
        data = data[: data.rfind(b"\n") + 1]
    for line in data.decode().splitlines():
        if line.strip():
            rec = json.loads(line)
            done.setdefault(rec.get("shard", ""), set()).add(rec["key"])
    return done


def index_rows(folder: Path) -> list[dict[str, Any]]:
    if not (folder / INDEX_FILE).is_file():
        return []
    import pyarrow.parquet as pq

    return pq.read_table(folder / INDEX_FILE).to_pylist()


# ---- the actor -----------------------------------------------------------------------------------


def _error(shard: str, key: str | None, videoid: str | None, message: str) -> str:
    return json.dumps({"key": key, "videoid": videoid, "shard": shard, "error": message})


class ShardCaptioner:
    """A Ray actor holding one model; called with a batch of ``{"shard", "skip"}`` rows."""

    def __init__(self, cfg: BatchCaptionConfig, kind: str):
        from infer.load import load

        self.cfg, self.kind = cfg, kind
        self.loaded = load(cfg.model)

    def _caption(self, samples: list[dict[str, Any]], shard: str) -> dict[str, np.ndarray]:
        from pipeline.evaluation import model_input

        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        feats = model_input(model, samples, self.kind, self.loaded.device)
        stamps = [s["meta"].get("timestamps") for s in samples]
        captions = caption_features(model, tokenizer, feats, self.cfg.generation, stamps)
        lines = [
            json.dumps({"key": s["key"], "videoid": s["meta"].get("videoid"), "caption": c, "shard": shard})
            for s, c in zip(samples, captions, strict=True)
        ]
        return {"line": np.array(lines, dtype=object)}

    def _usable(self, s: dict[str, Any]) -> str | None:
        x = s.get(self.kind)
        if x is None:
            return f"sample has no {self.kind}"
        if x.ndim - SAMPLE_NDIM[self.kind] not in (0, 1):
            return f"{self.kind} has shape {list(x.shape)}"
        return None

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        size = self.cfg.generation.batch_size
        for shard_path, skip in zip(batch["shard"], batch["skip"], strict=True):
            shard, skip = Path(shard_path).name, set(json.loads(skip))
            pending, errors = [], []
            try:
                for s in read_shard(shard_path):
                    if s["key"] in skip:
                        continue
                    if problem := self._usable(s):
                        errors.append(_error(shard, s["key"], s["meta"].get("videoid"), problem))
                        continue
                    pending.append(s)
                    if len(pending) == size:
                        yield self._caption(pending, shard)
                        pending = []
            except Exception as e:  # a corrupt shard: reported, retried by the next run
                errors.append(_error(shard, None, None, f"cannot read shard: {type(e).__name__}: {e}"))
            if pending:
                yield self._caption(pending, shard)
            if errors:
                yield {"line": np.array(errors, dtype=object)}


# ---- the driver ----------------------------------------------------------------------------------


def _plan(cfg: BatchCaptionConfig, done: dict[str, set[str]]) -> tuple[list[Path], dict[str, Any]]:
    """Shards still to caption, and what the index says (expected ok rows, preprocessing failures)."""
    folder = Path(cfg.shards)
    if not folder.is_dir():
        raise ConfigError(f"shards: folder {cfg.shards!r} does not exist")
    shards = list_shards(folder)
    if not shards:
        raise ConfigError(f"shards: {cfg.shards!r} holds no shard-*.tar / shard-*.arrow files")
    rows = index_rows(folder)
    ok: dict[str, set[str]] = {}
    for r in rows:
        if r["status"] == "ok":
            ok.setdefault(r["shard"], set()).add(r["key"])
    failed = [r for r in rows if r["status"] != "ok"]
    todo = [p for p in shards if not (rows and ok.get(p.name, set()) <= done.get(p.name, set()))]
    info = {
        "expected": sum(len(v) for v in ok.values()) if rows else None,
        "preprocess_failed": len(failed),
        "preprocess_reasons": dict(Counter(r["reason"] for r in failed)),
    }
    return todo, info


def run(cfg: BatchCaptionConfig) -> dict[str, Any]:
    """Caption every sample of ``cfg.shards`` not yet in ``cfg.output``; returns the summary."""
    import ray

    check_writable(Path(cfg.output).absolute().parent, "output")
    resolved = resolve(cfg.model)
    check_llm(resolved.mcfg, resolved.weights)  # here, not as a traceback from inside an actor
    kind = inspect_shards(cfg.shards, cfg.input, mcfg=resolved.mcfg, setting="shards").kind
    out = Path(cfg.output)
    done = read_done(out)
    todo, info = _plan(cfg, done)
    resumed = sum(len(v) for v in done.values())
    print(f"[caption-shards] {len(todo)} shards to caption; {resumed} captions already in {out}", flush=True)
    written: set[tuple[str, str]] = {(s, k) for s, keys in done.items() for k in keys}
    errors: list[dict[str, Any]] = []
    t0, new = time.monotonic(), 0
    if todo:
        owns = init_ray(cfg.ray_address, cfg.workers)
        try:
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars, ctx.verbose_stats_logs = False, False
            gpus = cfg.num_gpus
            if gpus is None:
                gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
            items = [{"shard": str(p), "skip": json.dumps(sorted(done.get(p.name, ())))} for p in todo]
            ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                ShardCaptioner,
                fn_constructor_args=(cfg, kind),
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
                num_gpus=gpus,
                num_cpus=cfg.num_cpus,
            )
            with open(out, "a") as f, quiet_actor_restart_warning():
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    for line in batch["line"]:
                        rec = json.loads(line)
                        if "error" in rec:
                            errors.append(rec)
                        elif (rec["shard"], rec["key"]) not in written:
                            written.add((rec["shard"], rec["key"]))
                            f.write(line + "\n")
                            new += 1
                    f.flush()
                    os.fsync(f.fileno())
                    rate = new / max(time.monotonic() - t0, 1e-9)
                    total = f"/{info['expected']}" if info["expected"] is not None else ""
                    print(
                        f"[caption-shards] {resumed + new}{total} captioned  {rate:.2f} clips/s  "
                        f"failed {len(errors)}",
                        flush=True,
                    )
        finally:
            shutdown_ray(owns)
    return {
        "output": str(out),
        "captioned": resumed + new,
        "new": new,
        "resumed": resumed,
        "failed": len(errors),
        "failures": errors,
        **info,
        "seconds": round(time.monotonic() - t0, 2),
    }


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"[caption-shards] {s['captioned']} captions in {s['output']} ({s['new']} new, {s['resumed']} from "
        f"an earlier run) in {s['seconds']} s; {s['failed']} failed"
    ]
    lines += [f"  failed: {e['shard']} {e['key']}: {e['error']}" for e in s["failures"][:20]]
    if s["preprocess_failed"]:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(s["preprocess_reasons"].items()))
        lines.append(
            f"  not captioned: {s['preprocess_failed']} rows the preprocessing job failed ({reasons})"
        )
    return "\n".join(lines)
