"""Stopping ahead of a Slurm time limit or preemption (slurm/train.sbatch).

The batch script forwards STOP_SIGNAL ahead of the limit; every rank saves a checkpoint at the next step
boundary and exits REQUEUE_EXIT_CODE, the script requeues the job and the requeued job resumes from that
checkpoint (same run_dir, same MLflow run).
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNAL = signal.SIGUSR1
REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"


class StopRequest:
    """A flag set by STOP_SIGNAL, read once per step; ranks agree through the step's all-reduce.

    Create it before the data loader forks its workers, so they inherit the handler."""

    def __init__(self) -> None:
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(STOP_SIGNAL, self._set)

    def _set(self, signum, frame) -> None:
        self.requested = True
