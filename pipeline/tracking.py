"""Experiment tracking behind a small interface: params, metrics, artifacts, close.

Rank 0 gets an ``MlflowTracker``, every other rank a ``NullTracker``. The store is, in order: the
config's ``tracking_uri``, ``$MLFLOW_TRACKING_URI``, else ``sqlite:///RUN_DIR/mlflow.db`` (never the file
store). The MLflow run id is kept in ``RUN_DIR/mlflow_run_id`` so a resumed run continues the same run.

Everything a run writes stays in its folder: with the default store, the artifact location recorded in
``mlflow.db`` is re-pointed at this folder's ``mlartifacts/`` whenever the store is opened, so a copied
or moved run folder never writes into the one it came from. A run resumed after a crash logs each step
once: points the killed attempt already logged past the checkpoint are not logged again (resume is
exact, so they hold the same losses).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from pipeline.rundir import MLFLOW_ARTIFACTS, MLFLOW_DB, MLFLOW_RUN_ID


class NullTracker:
    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def skip_logged_steps(self) -> None:
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


class MlflowTracker:
    """One MLflow run; resumes the run whose id is stored in ``run_dir``."""

    def __init__(self, run_dir: str | Path, experiment: str, uri: str | None = None, run_name=None):
        from mlflow.tracking import MlflowClient

        self.uri = resolve_uri(run_dir, uri)
        id_file = Path(run_dir) / MLFLOW_RUN_ID
        self.resumed = id_file.is_file()
        self.logged: dict[str, int] = {}  # metric -> last step already in the store (see skip_logged_steps)
        if self.resumed and self.uri == resolve_uri(run_dir) and self.uri.startswith("sqlite:///"):
            rehome_artifacts(Path(run_dir) / MLFLOW_DB, Path(run_dir) / MLFLOW_ARTIFACTS)
        self.client = MlflowClient(tracking_uri=self.uri)
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

    def log_params(self, params: dict[str, Any]) -> None:
        """Logged once per run: a resumed run keeps the first attempt's params (MLflow refuses changes)."""
        from mlflow.entities import Param

        if self.resumed:
            return
        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        points = [Metric(k, float(v), ts, step) for k, v in metrics.items() if step > self.logged.get(k, -1)]
        if points:
            self.client.log_batch(self.run_id, metrics=points)

    def skip_logged_steps(self) -> None:
        """From now on, do not log a metric at a step the store already holds for it: a training run
        resumed from its last checkpoint recomputes the steps its killed attempt logged after it."""
        latest = self.client.get_run(self.run_id).data.to_proto().metrics  # the newest point per key
        self.logged = {m.key: m.step for m in latest}

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


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
    if not (is_main and enabled):
        return NullTracker()
    return MlflowTracker(run_dir, experiment, uri, run_name)
