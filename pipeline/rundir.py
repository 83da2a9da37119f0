"""The run folder of a training job: every file name in it, defined once and imported where used.

    RUN/
      config.yaml                 resolved TrainConfig                          CONFIG
      model.yaml                  resolved ModelConfig                          MODEL_CONFIG
      ds_config.json              the DeepSpeed config as used                  DS_CONFIG
      init_from.json              with init_from: start weights + checksum      INIT_FROM
      metrics.jsonl               one line per optimizer step                   METRICS
      eval.jsonl                  one line per validation (eval.shards)         EVAL
      report/                     cli.py report's HTML + PNG                     REPORT
      mlflow.db  mlartifacts/     the default MLflow store and its artifacts    MLFLOW_DB, MLFLOW_ARTIFACTS
      mlflow_run_id               the MLflow run a resumed job continues        MLFLOW_RUN_ID
      keys.jsonl                  data.log_keys: each step's sample keys        KEYS
      .lock                       held by the running job (pipeline.folderlock)  LOCK_FILE there
      COMPLETE                    written after the final export: the run      COMPLETE
                                  finished (step, loss, the export's SHA-256s)
      checkpoints/step_00001000/  CHECKPOINTS / checkpoint_tag(step)
          train_state.json        the TrainState (step, data position, ...)     TRAIN_STATE
          trainable_state.pt      fp32 master weights + Adam moments, whole     TRAINABLE_STATE
          export/                 trainable-only export                         EXPORT
          COMPLETE                written last: the checkpoint is usable        COMPLETE
          (before elastic resume: train_state_rank{R}.json + DeepSpeed's files, train_state_file(rank))
      export/                     the final export

An export folder (``RUN/export``, ``step_N/export``, or any ``cli.py convert`` output) holds
``trainable.safetensors`` (TRAINABLE_WEIGHTS) and ``model.yaml`` (MODEL_CONFIG).
"""

from __future__ import annotations

CONFIG = "config.yaml"
MODEL_CONFIG = "model.yaml"
DS_CONFIG = "ds_config.json"
INIT_FROM = "init_from.json"
METRICS = "metrics.jsonl"
EVAL = "eval.jsonl"
REPORT = "report"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
MLFLOW_RUN_ID = "mlflow_run_id"
CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
EXPORT = "export"
TRAINABLE_WEIGHTS = "trainable.safetensors"
TRAIN_STATE = "train_state.json"
TRAINABLE_STATE = "trainable_state.pt"
KEYS = "keys.jsonl"  # data.log_keys: each step's sample keys


def checkpoint_tag(step: int) -> str:
    """``step_00001000``: zero-padded, so names sort by step."""
    return f"step_{step:08d}"


def train_state_file(rank: int) -> str:
    """A checkpoint written before elastic resume: one train state per rank."""
    return f"train_state_rank{rank}.json"
