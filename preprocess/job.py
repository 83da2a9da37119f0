"""The preprocessing job: WebVid (CSV/TSV + videos, or WebDataset tars) -> frame shards, on Ray Data.

Single node, all cores::

    python cli.py preprocess --annotations webvid/annotations --videos webvid/videos --output shards/

Existing Ray cluster (e.g. ``slurm/preprocess.sbatch``)::

    python cli.py preprocess ... --ray-address auto

The driver streams the annotations into a plan file (``preprocess.plan``: shards of
``samples_per_shard`` rows, each with a digest of its rows) while Ray starts, and hands every
unfinished shard to Ray Data as work units: whole shards when there are enough of them to keep every
core busy, slices of shards otherwise (a shard is then joined when its last slice is done). A shard
is finished when its index part exists and carries the digest of the rows it holds now, so a rerun
with the same arguments skips finished shards, redoes shards whose input rows changed, and ends with
the same bytes as an uninterrupted run. The driver keeps O(shards) state: no per-row Python objects.
"""

from __future__ import annotations

import _thread
import errno
import json
import math
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import ConfigError, check_writable, out_of_space, to_dict
from pipeline.folderlock import LOCK_FILE, folder_lock
from pipeline.raycluster import init_ray, quiet_actor_restart_warning, shutdown_ray
from pipeline.shards import (
    CONFIG_FILE,
    ENCODER_FILE,
    INDEX_FILE,
    INDEX_SCHEMA,
    PARTS_DIR,
    PLAN_FILE,
    STAGING_DIR,
    SUMMARY_FILE,
    commit,
    list_shards,
    part_digest,
    read_shard_config,
    tmp_path,
    write_json,
)
from preprocess.config import PreprocessConfig
from preprocess.plan import ShardPlan, check_inputs, write_plan
from preprocess.steps import WorkUnit, part_path, process_unit, shard_path, warm_worker

UNITS_PER_WORKER = 16  # when shards are few: enough units that the last one running alone is short
INDEX_ROW_GROUP = 1 << 16  # rows per index.parquet row group
MAX_TASKS = 2048  # Ray tasks (Ray Data blocks) per job; more units than this share tasks
MAX_WARM = 1024  # warm-up tasks at most (one per decoding slot)


def resolve_paths(cfg: PreprocessConfig) -> None:
    """Absolute input/output paths: Ray workers may run elsewhere, and the fingerprint must not
    depend on the directory the job was started from."""
    for name in ("annotations", "videos", "images", "tars", "output"):
        value = getattr(cfg, name)
        if value:
            setattr(cfg, name, os.path.abspath(value))


def check_output(cfg: PreprocessConfig) -> None:
    """Refuse an output folder that holds another config's shards (a resume must match exactly) or
    that cannot be written, before any work."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output: {cfg.output!r} exists and is not a folder")
    check_writable(out)
    theirs = read_shard_config(out)
    if theirs is not None:
        if theirs.fingerprint != cfg.output_fingerprint():
            diff = {
                k: (v, to_dict(cfg).get(k))
                for k, v in theirs.config.items()
                if k not in ("workers", "ray_address", "progress_every_s", "object_store_mb")
                and to_dict(cfg).get(k) != v
            }
            raise ConfigError(
                f"output: {cfg.output!r} holds shards written with another config (differs in: "
                f"{', '.join(f'{k}: {a!r} there vs {b!r} now' for k, (a, b) in diff.items()) or 'inputs'}); "
                "use a new output folder or the same arguments"
            )
    elif any(p.name != LOCK_FILE for p in out.iterdir()):
        raise ConfigError(f"output: {cfg.output!r} is not empty and was not written by this job")


def prepare_output(cfg: PreprocessConfig) -> None:
    """Folders, the config marker, and no leftovers of a killed run: temporary files and staged
    units (a shard whose units were not all done is redone whole)."""
    out = Path(cfg.output)
    (out / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    staging = out / STAGING_DIR
    staging.mkdir(exist_ok=True)
    for stale in [*out.glob(".*.tmp-*"), *(out / PARTS_DIR).glob(".*.tmp-*"), *staging.iterdir()]:
        stale.unlink()  # final names are only ever complete files
    write_json({"fingerprint": cfg.output_fingerprint(), "config": to_dict(cfg)}, out / CONFIG_FILE)


def reconcile(cfg: PreprocessConfig, plans: list[ShardPlan]) -> tuple[list[ShardPlan], int, int]:
    """Shards to do: those without an index part for their current rows. A part written for other
    rows (the input changed) is dropped with its shard, as are shards past the input's end.
    Returns (todo, rows already done, shards whose input changed)."""
    out = Path(cfg.output)
    existing = {int(p.stem.split("-")[1]): p for p in (out / PARTS_DIR).glob("shard-*.parquet")}
    todo, resumed, changed = [], 0, 0
    for plan in plans:
        part = existing.pop(plan.shard, None)
        if part is not None and part_digest(part) == plan.digest and _has_shard_file(cfg, plan.shard, part):
            resumed += plan.rows
            continue
        changed += part is not None
        _drop_shard(cfg, plan.shard)
        todo.append(plan)
    for shard in existing:  # the input got shorter
        changed += 1
        _drop_shard(cfg, shard)
    return todo, resumed, changed


def _has_shard_file(cfg: PreprocessConfig, shard: int, part: Path) -> bool:
    """A part with ok rows needs its shard file; a shard without ok rows has none."""
    if shard_path(cfg, shard).exists():
        return True
    status = pq.read_table(part, columns=["status"]).column("status")
    return not pc.any(pc.equal(status, "ok")).as_py()


def _drop_shard(cfg: PreprocessConfig, shard: int) -> None:
    part_path(cfg, shard).unlink(missing_ok=True)  # the commit marker first
    shard_path(cfg, shard).unlink(missing_ok=True)


def plan_units(todo: list[ShardPlan], cpus: int) -> list[WorkUnit]:
    """Whole shards when they keep every core busy; else slices sized from the rows and cores, so the
    number of cores at work never depends on ``samples_per_shard``."""
    rows = sum(p.rows for p in todo)
    size = max(p.rows for p in todo) if todo else 1
    if cpus > 1 and len(todo) < cpus * UNITS_PER_WORKER:
        size = max(1, min(size, -(-rows // (cpus * UNITS_PER_WORKER))))
    units = []
    for p in todo:
        n = -(-p.rows // size)
        bounds = [p.rows * i // n for i in range(n + 1)]
        units += [WorkUnit(p.shard, i, n, bounds[i], bounds[i + 1], p.digest) for i in range(n)]
    return units


def group_units(units: list[WorkUnit]) -> list[list[WorkUnit]]:
    """Units per Ray task: one, up to ``MAX_TASKS`` tasks; beyond, consecutive units share a task.
    Ray Data keeps ~12 KB of driver state per block (measured: 80 vs 4,000 one-row blocks), so one
    task per shard would make the driver grow with the input again (41,800 shards at WebVid-10M)."""
    per = max(1, -(-len(units) // MAX_TASKS))
    return [units[i : i + per] for i in range(0, len(units), per)]


class _Tracker:
    """A Ray actor: counts clips across tasks for the driver's progress line, and tells the unit
    that completes a split shard that it is the last (a set per shard, so a retried unit counts once)."""

    def __init__(self):
        self.ok, self.failed, self.reasons = 0, 0, Counter()
        self.examples: dict[str, str] = {}  # the first message of each failure reason
        self.units: dict[int, set[int]] = {}

    def add(self, delta: dict) -> None:
        self.ok += delta["ok"]
        self.failed += delta["failed"]
        self.reasons.update(delta["reasons"])
        for reason, message in delta.get("examples", {}).items():
            self.examples.setdefault(reason, message)

    def get(self) -> tuple[int, int, dict]:
        return self.ok, self.failed, dict(self.reasons)

    def suspect(self, rows: int) -> tuple[str, int, str] | None:
        """(reason, rows, a message) when no row is ok yet and at least ``rows`` rows all failed for
        one decoding reason (see ``config_suspect``)."""
        reason = config_suspect(self.ok, self.failed, self.reasons, rows)
        return None if reason is None else (reason, self.failed, self.examples.get(reason, ""))

    def unit_done(self, shard: int, unit: int, units: int) -> bool:
        done = self.units.setdefault(shard, set())
        done.add(unit)
        if len(done) < units:
            return False
        del self.units[shard]
        return True


# Failures a configuration causes for every row (frame size, frame count, decoder limits), which the
# per-row message would otherwise blame on each video. missing_file and the like name the path already.
SUSPECT_REASONS = ("decode_error", "decode_memory", "decoder_crashed", "decode_timeout", "too_short")


def config_suspect(ok: int, failed: int, reasons: dict[str, int], rows: int) -> str | None:
    """The reason when the first ``rows`` (or more) rows all failed for one of SUSPECT_REASONS."""
    if rows < 1 or ok or failed < rows or len(reasons) != 1:
        return None
    (reason,) = reasons
    return reason if reason in SUSPECT_REASONS else None


def _suspect_error(cfg: PreprocessConfig, found: tuple[str, int, str]) -> ConfigError:
    reason, rows, message = found
    return ConfigError(
        f"stopped: the first {rows} rows all failed as {reason} ({message[:160]}); that is probably the "
        f"configuration, not the videos (size={cfg.size}, num_frames={cfg.num_frames}, "
        f"min_frames={cfg.required_frames}, decode_memory_mb={cfg.decode_memory_mb}, "
        f"decode_timeout_s={cfg.decode_timeout_s:g}); config_check_rows=0 goes on regardless"
    )


def _print_progress(done: int, failed: int, total: int, t0: float, reasons: dict) -> None:
    rate = done / max(time.monotonic() - t0, 1e-9)
    print(
        f"[preprocess] {done}/{total} clips  {rate:.1f} clips/s  failed {failed}"
        + (f" ({format_reasons(reasons)})" if reasons else ""),
        flush=True,
    )


def format_reasons(reasons: dict[str, int], top: int = 4) -> str:
    """The most frequent failure reasons, and "+N other" for the rest, so the counts add up."""
    ranked = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{k}={v}" for k, v in ranked[:top])
    rest = sum(v for _, v in ranked[top:])
    return shown + (f", +{rest} other" if rest else "")


def run(cfg: PreprocessConfig) -> dict[str, Any]:
    """Run the job; returns the summary (also written to ``OUTPUT/summary.json``). The job holds the
    output folder's lock (pipeline.folderlock): a second job into it is refused in one line. A full disk
    is one line naming the folder (committed shards stay and a rerun resumes), not a Ray traceback."""
    try:
        return _locked_run(cfg)
    except Exception as e:
        if (full := out_of_space(e, cfg.output)) is not None:
            raise full from None
        raise


def _locked_run(cfg: PreprocessConfig) -> dict[str, Any]:
    timing: dict[str, float] = {"start_to_run_s": _since_process_start()}
    resolve_paths(cfg)
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output: {cfg.output!r} exists and is not a folder")
    check_writable(out)
    with folder_lock(out, "output", "preprocess"):
        return _run(cfg, timing)


def _run(cfg: PreprocessConfig, timing: dict[str, float]) -> dict[str, Any]:
    t_start = time.monotonic()
    check_output(cfg)
    check_inputs(cfg)

    # Ray starts (seconds of subprocesses) while this thread streams the input into the plan and
    # imports Ray Data (1-3 s of imports the driver would otherwise pay after Ray is up)
    with ThreadPoolExecutor(1) as pool:
        t0 = time.monotonic()
        planning = pool.submit(_plan_and_import, cfg)
        owns_ray = init_ray(cfg.ray_address, local_cpus(cfg), cfg.object_store_mb)
        timing["ray_start_s"] = time.monotonic() - t0
        _warm_workers(cfg)
        try:
            plans = planning.result()
        except BaseException:
            shutdown_ray(owns_ray)
            raise
        timing["plan_s"] = time.monotonic() - t0
        timing["peak_rss_mb_after_plan"] = _peak_rss_mb()
    try:
        total = sum(p.rows for p in plans)
        if total == 0:
            (Path(cfg.output) / PLAN_FILE).unlink()
            raise ConfigError(f"input: {cfg.annotations or cfg.tars!r} holds no rows: nothing to do")
        prepare_output(cfg)  # only once the input has been read without error
        todo, resumed, changed = reconcile(cfg, plans)
        print(
            f"[preprocess] {total} input rows in {len(plans)} shards; {len(plans) - len(todo)} shards "
            f"({resumed} rows) already done; {len(todo)} to do"
            + (f" ({changed} redone or dropped: their input rows changed)" if changed else ""),
            flush=True,
        )
        t_work = time.monotonic()
        if todo:
            _run_units(cfg, todo, total - resumed, timing)
        work_s = time.monotonic() - t_work
    finally:
        t0 = time.monotonic()
        shutdown_ray(owns_ray)
        timing["ray_shutdown_s"] = time.monotonic() - t0
        timing["peak_rss_mb_after_work"] = _peak_rss_mb()
    t0 = time.monotonic()
    summary = _finish(cfg, plans, resumed, work_s)
    timing["index_s"] = time.monotonic() - t0
    timing["peak_rss_mb_after_index"] = _peak_rss_mb()
    summary["seconds"] = round(time.monotonic() - t_start, 3)
    summary["timing"] = {k: round(v, 3) for k, v in timing.items()}
    write_json(summary, Path(cfg.output) / SUMMARY_FILE)
    return summary


def local_cpus(cfg: PreprocessConfig) -> int:
    """CPUs of a local Ray cluster: ``--workers`` decoding slots plus, with the feature cache, the
    encoder actors' own ``features.num_cpus`` (an actor holds its CPUs for the whole job: with
    ``--workers 1`` and one 1-CPU actor in a 1-CPU cluster no decoding task could ever start). Without
    ``--workers``: every core, and at least one decoding slot beside the actors."""
    encoders = _encoder_cpus(cfg)
    if cfg.workers:
        return cfg.workers + encoders
    return max(os.cpu_count() or 1, 1 + encoders)


def _encoder_cpus(cfg: PreprocessConfig) -> int:
    """CPUs the feature-cache encoder actors hold for the whole job (0 without the cache)."""
    fc = cfg.features
    return math.ceil(fc.concurrency * fc.num_cpus) if fc.enabled else 0


def _warm_workers(cfg: PreprocessConfig) -> None:
    """One warm-up task per decoding slot, started as soon as Ray is up: the worker processes import
    Ray Data and start their decoder children while the driver finishes planning and starts the
    executor, instead of after. Ray Data's tasks then run in these idle processes of the same job.
    Nothing waits for them: a warm-up that fails leaves a cold worker, and the unit that runs there
    records its own failure."""
    import ray

    slots = max(1, int(ray.cluster_resources().get("CPU", 1)) - _encoder_cpus(cfg))
    task = ray.remote(num_cpus=1, max_retries=0)(warm_worker)
    for _ in range(min(slots, MAX_WARM)):
        task.remote(cfg)


def _plan_and_import(cfg: PreprocessConfig) -> list[ShardPlan]:
    plans = write_plan(cfg)
    import ray.data  # noqa: F401

    return plans


def _peak_rss_mb() -> float:
    """This process's high-water RSS so far: which phase makes the driver's peak."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _since_process_start() -> float:
    """Seconds since this process started (interpreter start-up and imports, before ``run``).

    On Linux from the kernel's start time in clock ticks since boot, against the boot-time clock;
    psutil's ``create_time`` adds the boot time rounded to whole seconds (measured: 0.49 s for a
    process 0.1 s old)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, AttributeError, ValueError, IndexError):
        import psutil

        return time.time() - psutil.Process().create_time()


def _run_units(cfg: PreprocessConfig, todo: list[ShardPlan], total: int, timing: dict) -> None:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.verbose_stats_logs = False
    tracker = ray.remote(num_cpus=0)(_Tracker).remote()
    units = plan_units(todo, int(ray.cluster_resources().get("CPU", 1)))

    def units_task(item: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for fields in json.loads(item["units"]):
            unit = WorkUnit(**fields)
            row = {"shard": unit.shard, "units": unit.units, "digest": unit.digest, "no_space": ""}
            try:
                row["ready"] = process_unit(unit, cfg, tracker)
            except OSError as e:  # the driver says it in one line, without Ray's task traceback
                if e.errno != errno.ENOSPC:
                    raise
                out.append({**row, "ready": False, "no_space": e.filename or cfg.output})
                break
            out.append(row)
        return out

    items = [{"units": json.dumps([vars(u) for u in group])} for group in group_units(units)]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).flat_map(units_task, num_cpus=1)
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
    suspect: list[tuple[str, int, str]] = []  # set by the reporter thread, which then interrupts us

    def report_loop() -> None:
        while not stop.wait(cfg.progress_every_s):
            ok, failed, reasons = ray.get(tracker.get.remote())
            _print_progress(ok + failed, failed, total, t0, reasons)
            if not suspect and (found := ray.get(tracker.suspect.remote(cfg.config_check_rows))):
                suspect.append(found)
                _thread.interrupt_main()  # the main thread waits inside Ray Data's iterator
                return

    reporter = threading.Thread(target=report_loop, daemon=True)
    reporter.start()
    try:
        try:
            with quiet_actor_restart_warning():
                for i, rec in enumerate(ds.iter_rows()):
                    if i == 0:
                        timing["first_unit_s"] = time.monotonic() - t0
                    if rec["no_space"]:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(rec["no_space"]))
                    if "encoder" in rec:
                        _check_encoder(cfg, str(rec["encoder"]))
                    if found := ray.get(tracker.suspect.remote(cfg.config_check_rows)):
                        raise _suspect_error(cfg, found)
        finally:
            stop.set()
            reporter.join()  # an interrupt the reporter sent arrives here at the latest
    except KeyboardInterrupt:
        if not suspect:
            raise
        raise _suspect_error(cfg, suspect[0]) from None
    timing["units"], timing["tasks"] = len(units), len(items)
    ok, failed, reasons = ray.get(tracker.get.remote())
    _print_progress(ok + failed, failed, total, t0, reasons)
    if found := ray.get(tracker.suspect.remote(cfg.config_check_rows)):
        raise _suspect_error(cfg, found)


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


def _conform(part: pa.Table) -> pa.Table:
    """A part written before the index gained columns (a resumed folder) gets them as nulls."""
    for field in INDEX_SCHEMA:
        if field.name not in part.column_names:
            part = part.append_column(field, pa.nulls(part.num_rows, field.type))
    return part.select(INDEX_SCHEMA.names)


def merge_index(cfg: PreprocessConfig, plans: list[ShardPlan]) -> tuple[int, Counter]:
    """Stream the shards' index parts, in order, into ``index.parquet``; returns (ok, failures)."""
    final = Path(cfg.output) / INDEX_FILE
    tmp = tmp_path(final)
    ok, failures = 0, Counter()
    pending: list[pa.Table] = []
    with pq.ParquetWriter(tmp, INDEX_SCHEMA) as writer:
        for plan in plans:
            part = _conform(pq.read_table(part_path(cfg, plan.shard)).replace_schema_metadata(None))
            rows = part.column("row").to_numpy()
            if not np.array_equal(rows, np.arange(plan.first_row, plan.first_row + plan.rows)):
                raise RuntimeError(f"internal error: index part of shard {plan.shard} does not hold its rows")
            is_ok = pc.equal(part.column("status"), "ok")
            ok += pc.sum(is_ok).as_py() or 0
            reasons = pc.value_counts(part.filter(pc.invert(is_ok)).column("reason"))
            failures.update({r["values"]: r["counts"] for r in reasons.to_pylist()})
            pending.append(part)
            if sum(t.num_rows for t in pending) >= INDEX_ROW_GROUP:  # few, large row groups: a small footer
                writer.write_table(pa.concat_tables(pending))
                pending = []
        if pending:
            writer.write_table(pa.concat_tables(pending))
    commit(tmp, final)
    return ok, failures


def duplicate_videoids(index: Path, examples: int = 10) -> dict[str, Any] | None:
    """Videoids that more than one input row carries (all are kept: they are distinct rows, e.g. one
    video under two captions), counted from ``index.parquet``; None when every videoid is unique."""
    ids = pq.read_table(index, columns=["videoid"]).column("videoid").drop_null()
    values, times = pc.value_counts(ids).flatten()  # a StructArray of (values, counts)
    repeated = pc.greater(times, 1)
    values, times = values.filter(repeated), times.filter(repeated)
    if not len(values):
        return None
    return {
        "videoids": len(values),
        "rows": pc.sum(times).as_py(),
        "examples": dict(zip(values[:examples].to_pylist(), times[:examples].to_pylist(), strict=True)),
    }


def _finish(cfg: PreprocessConfig, plans: list[ShardPlan], resumed: int, work_s: float) -> dict[str, Any]:
    out = Path(cfg.output)
    ok, failures = merge_index(cfg, plans)
    duplicates = duplicate_videoids(out / INDEX_FILE)
    total = sum(p.rows for p in plans)
    (out / PLAN_FILE).unlink(missing_ok=True)
    staging = out / STAGING_DIR
    if staging.is_dir() and not any(staging.iterdir()):
        staging.rmdir()
    processed = total - resumed
    return {
        "total": total,
        "ok": ok,
        "failed": total - ok,
        "failures": dict(sorted(failures.items())),
        "duplicate_videoids": duplicates,
        "shards": [p.name for p in list_shards(out)],
        "format": cfg.format,
        "resumed_rows": resumed,
        "work_seconds": round(work_s, 3),
        "clips_per_s": round(processed / work_s, 3) if processed and work_s > 0 else None,
        "fingerprint": cfg.output_fingerprint(),
        "encoder": json.loads((out / ENCODER_FILE).read_text())["encoder"] if cfg.features.enabled else None,
        "config": to_dict(cfg),
    }


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"preprocess: {s['ok']}/{s['total']} ok, {s['failed']} failed -> {s['config']['output']}",
        f"  shards: {len(s['shards'])} x {s['format']}   time: {s['seconds']:.1f} s"
        + (f"   throughput: {s['clips_per_s']:.2f} clips/s" if s["clips_per_s"] else "")
        + (f"   resumed: {s['resumed_rows']} rows" if s["resumed_rows"] else ""),
    ]
    for reason, n in s["failures"].items():
        lines.append(f"  failed {reason}: {n}")
    if d := s.get("duplicate_videoids"):
        lines.append(
            f"  note: {d['videoids']} videoids occur in more than one row ({d['rows']} rows, all kept)"
        )
    lines.append("  per-row status: index.parquet; details: summary.json")
    return "\n".join(lines)
