"""Experiment tracking behind a small interface: params, metrics, artifacts, close.

Rank 0 gets an ``MlflowTracker``, every other rank a ``NullTracker``. The store is, in order: the
config's ``tracking_uri``, ``$MLFLOW_TRACKING_URI``, else ``sqlite:///RUN_DIR/mlflow.db`` (never the file
store). The MLflow run id is kept in ``RUN_DIR/mlflow_run_id`` so a resumed run continues the same run.

Everything a run writes stays in its folder: with the default store, the artifact location recorded in
``mlflow.db`` is re-pointed at this folder's ``mlartifacts/`` whenever the store is opened, so a copied
or moved run folder never writes into the one it came from. A run resumed after a crash logs each step
once: points the killed attempt already logged past the checkpoint are not logged again (resume is
exact, so they hold the same losses).

A tracking server never costs training time: a run checks it answers before it starts (seconds, one
line when it does not); when it goes away mid-run, a warning is printed, training goes on (every step
is in ``metrics.jsonl``), and the points it missed are logged when it answers again (tried after
``RETRY_S`` seconds, then ever less often) or at the run's next start. MLflow's own retries (7, about
4 minutes per call) are cut to ``HTTP_RETRIES`` with ``HTTP_TIMEOUT_S`` unless the environment sets them.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError
from pipeline.rundir import METRICS, MLFLOW_ARTIFACTS, MLFLOW_DB, MLFLOW_RUN_ID

CHECK_TIMEOUT_S = 5.0  # the check before training
HTTP_RETRIES, HTTP_TIMEOUT_S = 1, 10  # per MLflow request (MLflow's defaults: 7 retries, 120 s)
RETRY_S, MAX_RETRY_S = 30.0, 600.0  # while the server is away: a try after 30 s, 60 s, ... at most 10 min
BATCH = 1000  # metrics per log_batch (MLflow's limit)


class TrackingUnavailable(ConfigError):
    """The tracking server does not answer; the message names the URI."""


def check_server(uri: str) -> None:
    """One request with a short timeout to an http(s) tracking server's ``/health``; :class:`TrackingUnavailable`
    in one line when nothing answers, or something other than MLflow does (a proxy's 404 or 502). 401/403
    are a server that wants credentials: MLflow's client sends them, this check does not."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=CHECK_TIMEOUT_S):
            pass
    except urllib.error.HTTPError as e:
        if e.code not in (401, 403):
            raise TrackingUnavailable(
                f"tracking_uri: {uri} answers HTTP {e.code} at /health: no MLflow server runs there; start "
                "it, set tracking_uri to one that runs, or tracking=false to train without MLflow"
            ) from None
    except (OSError, ValueError) as e:
        why = getattr(e, "reason", e)
        raise TrackingUnavailable(
            f"tracking_uri: no MLflow server answers at {uri} ({why}); start it, set tracking_uri to one "
            "that runs, or tracking=false to train without MLflow"
        ) from None


class NullTracker:
    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def skip_logged_steps(self) -> None:
        pass

    def logged_step(self) -> int:
        return 1 << 62  # nothing to backfill

    def backfill(self, rows: list[dict[str, Any]]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def git_commit(cwd: str | Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def resolve_uri(run_dir: str | Path, uri: str | None = None) -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path(run_dir).resolve() / MLFLOW_DB}"


def _errors() -> tuple[type[BaseException], ...]:
    """What a store that is away raises (connection refused, timeouts, 5xx after the retries)."""
    import requests
    from mlflow.exceptions import MlflowException

    return (MlflowException, requests.exceptions.RequestException, OSError, sqlite3.Error)


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]


class MlflowTracker:
    """One MLflow run; resumes the run whose id is stored in ``run_dir``. ``backlog`` (the run's
    metrics.jsonl) is where points missed while the server was away are read back from; without it they
    are kept in memory."""

    def __init__(
        self, run_dir: str | Path, experiment: str, uri: str | None = None, run_name=None, backlog=None
    ):
        from mlflow.tracking import MlflowClient

        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(HTTP_RETRIES))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(HTTP_TIMEOUT_S))
        self.uri = resolve_uri(run_dir, uri)
        self.backlog = Path(backlog) if backlog else None
        self.pending: dict[int, dict[str, float] | None] = {}  # step -> metrics (None: in the backlog)
        self.away_since: float | None = None
        self.next_try, self.retry_s = 0.0, RETRY_S
        id_file = Path(run_dir) / MLFLOW_RUN_ID
        self.resumed = id_file.is_file()
        self.logged: dict[str, int] = {}  # metric -> last step already in the store (see skip_logged_steps)
        if self.resumed and self.uri == resolve_uri(run_dir) and self.uri.startswith("sqlite:///"):
            rehome_artifacts(Path(run_dir) / MLFLOW_DB, Path(run_dir) / MLFLOW_ARTIFACTS)
        self.client = MlflowClient(tracking_uri=self.uri)
        try:
            self._open(id_file, experiment, run_dir, run_name)
        except _errors() as e:
            raise TrackingUnavailable(
                f"tracking: MLflow at {self.uri} failed ({_first_line(e)}); tracking=false trains without it"
            ) from None

    def _open(self, id_file: Path, experiment: str, run_dir, run_name) -> None:
        if self.resumed:
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            exp = self.client.get_experiment_by_name(experiment)
            # a SQLite store lives in the run dir, and so do its artifacts (MLflow's default is ./mlruns)
            where = (
                (Path(run_dir) / MLFLOW_ARTIFACTS).resolve().as_uri()
                if self.uri.startswith("sqlite")
                else None
            )
            exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment, where)
            self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
            id_file.write_text(self.run_id)

    # ---- a store that goes away: warn, keep what it missed, log it when it answers again ----------

    def _away(self, e: BaseException) -> None:
        if self.away_since is None:
            self.away_since, self.retry_s = time.monotonic(), RETRY_S
            print(
                f"[tracking] warning: MLflow at {self.uri} does not answer ({_first_line(e)}); training goes "
                f"on and {METRICS} keeps every step: the points it misses are logged when it answers "
                "again, or at the run's next start",
                flush=True,
            )
        else:  # a server that hangs costs up to a timeout per try: tries get rarer
            self.retry_s = min(2 * self.retry_s, MAX_RETRY_S)
        self.next_try = time.monotonic() + self.retry_s

    def _call(self, what: str, fn, *args, **kwargs) -> bool:
        try:
            fn(*args, **kwargs)
            return True
        except _errors() as e:
            self._away(e)
            print(f"[tracking] warning: MLflow did not get {what}", flush=True)
            return False

    def _send(self, points: list[tuple[int, dict[str, float]]]) -> bool:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), ts, step)
            for step, metrics in points
            for k, v in metrics.items()
            if k != "step" and step > self.logged.get(k, -1)
        ]
        try:
            for i in range(0, len(batch), BATCH):
                self.client.log_batch(self.run_id, metrics=batch[i : i + BATCH])
        except _errors() as e:
            self._away(e)
            return False
        return True

    def _missed_points(self) -> list[tuple[int, dict[str, float]]]:
        kept = [(step, m) for step, m in self.pending.items() if m is not None]
        wanted = {step for step, m in self.pending.items() if m is None}
        if wanted and self.backlog is not None and self.backlog.is_file():
            for line in self.backlog.read_text().splitlines():
                row = json.loads(line) if line else {}
                if row.get("step") in wanted:
                    kept.append((row["step"], row))
        return sorted(kept, key=lambda p: p[0])

    def _retry(self, force: bool = False) -> None:
        if not force and time.monotonic() < self.next_try:
            return
        points = self._missed_points()
        if self._send(points):
            print(
                f"[tracking] MLflow at {self.uri} answers again: logged {len(points)} missed steps",
                flush=True,
            )
            self.pending.clear()
            self.away_since = None

    def _keep(self, step: int, metrics: dict[str, float]) -> None:
        self.pending[step] = None if self.backlog is not None else dict(metrics)

    # ---- the interface ------------------------------------------------------------------------------

    def log_params(self, params: dict[str, Any]) -> None:
        """Logged once per run: a resumed run keeps the first attempt's params (MLflow refuses changes)."""
        from mlflow.entities import Param

        if self.resumed:
            return
        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            if not self._call(
                "the run's params", self.client.log_batch, self.run_id, params=items[i : i + 100]
            ):
                return

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.away_since is not None:
            self._keep(step, metrics)
            self._retry()
        elif not self._send([(step, metrics)]):
            self._keep(step, metrics)

    def backfill(self, rows: list[dict[str, Any]]) -> None:
        """Log ``rows`` ({"step": N, metric: value, ...}) that an earlier attempt could not."""
        if rows and self._send([(r["step"], r) for r in rows]):
            print(f"[tracking] logged {len(rows)} steps an earlier attempt could not", flush=True)
        elif rows:
            for r in rows:
                self._keep(r["step"], r)

    def logged_step(self, key: str = "loss") -> int:
        """The newest step the store holds for ``key`` (-1: none), as of :meth:`skip_logged_steps`."""
        return self.logged.get(key, -1)

    def skip_logged_steps(self) -> None:
        """From now on, do not log a metric at a step the store already holds for it: a training run
        resumed from its last checkpoint recomputes the steps its killed attempt logged after it."""
        try:
            latest = self.client.get_run(self.run_id).data.to_proto().metrics  # the newest point per key
        except _errors() as e:
            self._away(e)
            return
        self.logged = {m.key: m.step for m in latest}

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        fn = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
        self._call(f"the artifact {path}", fn, self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            if not self._call(f"the tag {k}", self.client.set_tag, self.run_id, k, str(v)):
                return

    def close(self, status: str = "FINISHED") -> None:
        if self.pending:
            self._retry(force=True)
        if self.pending:
            print(f"[tracking] warning: {len(self.pending)} steps are not in MLflow yet", flush=True)
            return  # left RUNNING: the next start logs them, then ends the run
        self._call(f"the run's end ({status})", self.client.set_terminated, self.run_id, status=status)


def rehome_artifacts(db: Path, artifacts: Path) -> None:
    """Point the artifact locations in a run folder's own SQLite store at ``artifacts`` (this folder's).

    MLflow records absolute artifact URIs; a run folder copied with ``cp -r`` would otherwise keep
    logging into the original. MLflow has no API to move an experiment, so the two columns that hold
    the location are rewritten (experiments.artifact_location and each run's artifact_uri under it).
    """
    if not db.is_file():
        return
    new = artifacts.resolve().as_uri()
    with closing(sqlite3.connect(db)) as con, con:
        for exp_id, old in con.execute("SELECT experiment_id, artifact_location FROM experiments").fetchall():
            if not old or old == new or not old.endswith("/" + MLFLOW_ARTIFACTS):
                continue  # MLflow's Default experiment (./mlruns) is never used by a training run
            con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (new, exp_id))
            con.execute(
                "UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
                "WHERE experiment_id = ? AND substr(artifact_uri, 1, ?) = ?",
                (new, len(old) + 1, exp_id, len(old), old),
            )


@contextmanager
def attached(run_dir: str | Path, experiment: str, uri: str | None = None) -> Iterator[MlflowTracker]:
    """The MLflow run of ``run_dir`` (created when the run has none), for logging after its training
    ended (evaluation scores, report files); its status is left as it was."""
    tracker = MlflowTracker(run_dir, experiment, uri)
    before = tracker.client.get_run(tracker.run_id).info.status if tracker.resumed else "FINISHED"
    try:
        yield tracker
    finally:
        tracker.close(before if before != "RUNNING" else "FINISHED")


def make_tracker(is_main: bool, enabled: bool, run_dir, experiment: str, uri=None, run_name=None):
    """A training run's tracker: missed points are read back from its metrics.jsonl."""
    if not (is_main and enabled):
        return NullTracker()
    return MlflowTracker(run_dir, experiment, uri, run_name, backlog=Path(run_dir) / METRICS)
