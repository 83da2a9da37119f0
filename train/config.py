"""The training stage's typed config (YAML + ``key=value`` overrides; see configs/stage{1,2}_*.yaml).

One config serves both stages: stage 1 is ``data.task=caption`` on caption shards, stage 2 is
``data.task=conversation`` (with ``data.template``) on instruction shards, started from a stage-1
export with ``init_from``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.config import ConfigError, to_dict
from pipeline.evaluation import EvalSettings
from pipeline.model import PRESETS, ModelConfig, preset
from pipeline.rundir import CONFIG
from pipeline.tracking import flatten

# Keys a rerun of an existing run (same run_dir) may change; any other difference is refused, because the
# checkpoint, the data position and the MLflow params all belong to the settings the run started with.
# They change how long it runs, how often it saves/logs/validates, where it is (a copied folder), the
# loader's workers and prefetch depth, and whether sample keys are logged; none changes what a step
# computes. The world size (GPUs, nodes) is not a setting: it may change too (see elastic_batch).
RESUMABLE_KEYS = (
    "run_dir",
    "max_steps",
    "epochs",
    "save_every",
    "keep_last",
    "log_every",
    "run_name",
    "data.prefetch",
    "data.workers",  # the global data order does not depend on them
    "data.log_keys",
    "optim.skip_nonfinite",  # a run stopped at a non-finite step is rerun with a skip budget
    "eval.",  # validation only reads the model
)


@dataclass
class DatasetSpec:
    shards: str
    weight: float = 1.0
    num_frames: int | None = None  # frames per clip in these shards (images: 1); default data.num_frames


@dataclass
class DataConfig:
    # one shard folder (``data.shards=DIR``) or several mixed by weight: each batch from one of them
    shards: str | None = None
    datasets: list[DatasetSpec] = field(default_factory=list)
    input: Literal["auto", "frames", "features"] = "auto"  # auto: cached features when the shards hold them
    # frames only: the original's RandomResizedCropVideo(224, scale 0.5-1, bicubic), one crop per clip per
    # visit, seeded by the sample's place in the stream (exact resume); cached features carry the crops of
    # their views instead (preprocess --views K with --cache-features)
    random_crop: bool = True
    num_frames: int = 8  # the shards must hold exactly this many frames per clip (per dataset: its own key)
    # caption: stage 1, ``[BOS] <video> caption``; conversation: stage 2, the chat template (caption-only
    # samples, e.g. cc_sbu_align, take the original's prompt_wrap form with a seeded instruction)
    task: Literal["caption", "conversation"] = "caption"
    template: Literal["vicuna", "llama2"] | None = None  # conversation prompt style: must match the LLM
    # conversation labels: original = the original's masks token for token (Vicuna: assistant turns whole
    # with their "###Assistant: " header and newline, plus the "###" opening each human turn);
    # answers = only each answer and what ends it ("\n###" / " </s>")
    label_mask: Literal["original", "answers"] = "original"
    max_caption_tokens: int = 32  # a caption (also a caption used as answer) is cut to this many tokens
    max_len: int = 512  # conversation tokens incl. BOS and video block; too long: truncated, or skipped
    # unreadable/unusable samples are skipped with a warning naming the shard; more than this fraction of
    # the samples read (at least of one pass over the data) stops the run (train.data.check_error_budget)
    max_error_rate: float = 0.01
    workers: int = 2  # DataLoader workers per rank (0: load in the training process)
    prefetch: int = 2
    seed: int | None = None  # sample order; default: the run seed
    # shards whose samples are shuffled together in an epoch (train.data.GlobalOrder): a global batch
    # draws from up to this many shards; 1: each shard in file order
    shuffle_block: int = 8
    # the output of a preprocess job that did not finish (_plan.arrow, _staging/, no summary.json) is
    # refused; true trains on the shards it has, with a warning
    allow_unfinished: bool = False
    # write each step's sample keys (the whole global batch, in order) to RUN/keys.jsonl: a user can check
    # on their cluster that a resume on another topology trains the same batches
    log_keys: bool = False

    def specs(self) -> list[DatasetSpec]:
        """The datasets to mix, each with its frame count resolved."""
        specs = [DatasetSpec(self.shards)] if self.shards else list(self.datasets)
        return [dataclasses.replace(s, num_frames=s.num_frames or self.num_frames) for s in specs]


@dataclass
class OptimConfig:
    """AdamW + the original schedule: linear warmup_lr -> init_lr over warmup_steps, cosine to min_lr."""

    init_lr: float = 1e-4
    min_lr: float = 8e-5
    warmup_lr: float = 1e-6
    warmup_steps: int = 2500
    weight_decay: float = 0.05  # on ndim >= 2 params; biases and norms 0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 0.0  # max gradient norm; 0 = no clipping (the original clips nothing)
    # steps with a non-finite loss or gradient norm skipped (update not applied, logged) before the run
    # stops; 0: stop at the first one. Either way no checkpoint holds a non-finite step.
    skip_nonfinite: int = 0


@dataclass
class EvalConfig(EvalSettings):
    """Validation during training (train.validation): the held-out caption loss/perplexity of
    ``shards`` (None: no validation) every ``every`` steps, scored as ``cli.py evaluate`` scores it."""

    every: int = 500  # optimizer steps (and at the last step)
    max_new_tokens: int = 48  # greedy captions' length with ``metrics``


@dataclass
class TrainConfig:
    run_dir: str = "runs/stage1"
    model_preset: str = "vit-g-7b"
    # the preset's ModelConfig with the keys given here over it (fill_defaults); written out resolved
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: str | None = None  # default: model.llm_path; tiny preset without llm_path: built in code
    init_from: str | None = None  # trainable-weights export or Video-LLaMA .pth to start from
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # per rank per forward; global batch = micro_batch x grad_accum x world size of the run's first start,
    # kept on any later world size (elastic_batch adjusts grad_accum, and micro_batch if it must)
    micro_batch: int = 32
    grad_accum: int = 1
    max_steps: int | None = None  # optimizer steps; else epochs x steps_per_epoch
    epochs: int = 5
    steps_per_epoch: int | None = None  # the original: 2500 "iters per epoch"; default: samples / batch
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    zero_config: str = "ds_configs/zero2.json"
    seed: int = 42
    save_every: int = 1000
    keep_last: int = 2
    log_every: int = 1
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///<run_dir>/mlflow.db
    experiment: str = "videollama-stage1"
    run_name: str | None = None
    tracking: bool = True
    eval: EvalConfig = field(default_factory=EvalConfig)  # validation split (train.validation)

    def validate(self) -> None:
        if self.eval.every < 1 or self.eval.batch_size < 1:
            raise ConfigError("eval.every and eval.batch_size must be >= 1")
        specs = self.data.specs()
        if self.data.shards and self.data.datasets:
            raise ConfigError(
                "data: give data.shards or data.datasets, not both (to replace a config file's "
                "datasets by one folder on the command line: data.datasets=[] data.shards=DIR)"
            )
        if not specs:
            raise ConfigError("data.shards: a shard folder is required (or data.datasets)")
        if any(s.weight <= 0 for s in specs):
            raise ConfigError("data.datasets[].weight: weights must be > 0")
        if not 0 <= self.data.max_error_rate <= 1:
            raise ConfigError("data.max_error_rate: a fraction in 0..1")
        if self.data.shuffle_block < 1:
            raise ConfigError("data.shuffle_block must be >= 1 (shards shuffled together)")
        if self.data.workers < 0 or self.data.prefetch < 1:
            raise ConfigError(
                "data.workers must be >= 0 (0: load in the training process), data.prefetch >= 1"
            )
        if self.micro_batch < 1 or self.grad_accum < 1:
            raise ConfigError("micro_batch and grad_accum must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("max_steps: must be >= 1")
        if self.save_every < 1 or self.keep_last < 1:
            raise ConfigError("save_every and keep_last must be >= 1")
        max_frames = self.model.max_frames
        if not 1 <= self.data.num_frames <= max_frames:
            raise ConfigError(f"data.num_frames: {self.data.num_frames} is outside 1..model.max_frames")
        for i, s in enumerate(self.data.datasets):
            if s.num_frames is not None and not 1 <= s.num_frames <= max_frames:
                raise ConfigError(
                    f"data.datasets[{i}].num_frames: {s.num_frames} is outside 1..model.max_frames"
                )
        d = self.data
        if d.task == "conversation" and d.template is None:
            raise ConfigError(
                "data.template: conversation training needs the LLM's prompt style: 'vicuna' "
                "(Vicuna / LLaMA) or 'llama2' (LLaMA-2-chat)"
            )
        if d.max_caption_tokens < 1 or d.max_len < self.model.num_video_query_tokens + 2:
            raise ConfigError("data.max_caption_tokens must be >= 1 and data.max_len > the video block")
        o = self.optim
        if not (o.init_lr > 0 and o.min_lr >= 0 and o.warmup_lr >= 0 and o.warmup_steps >= 0):
            raise ConfigError("optim: learning rates must be >= 0 (init_lr > 0) and warmup_steps >= 0")
        if o.grad_clip < 0:
            raise ConfigError("optim.grad_clip: must be >= 0 (0: no clipping)")
        if o.skip_nonfinite < 0:
            raise ConfigError("optim.skip_nonfinite: must be >= 0 (0: stop at the first non-finite step)")

    @classmethod
    def fill_defaults(cls, data: dict[str, Any]) -> dict[str, Any]:
        """``model`` keys are given over the ``model_preset``'s sizes, not over ModelConfig's defaults."""
        name, model = data.get("model_preset", cls.model_preset), data.get("model") or {}
        if not isinstance(name, str) or name not in PRESETS:
            raise ConfigError(f"model_preset: {name!r} is not one of {', '.join(PRESETS)}")
        if not isinstance(model, dict):
            return data  # a ModelConfig already, or a wrong type that the type check names
        return {**data, "model": {**dataclasses.asdict(preset(name)), **model}}


def elastic_batch(global_batch: int, micro_batch: int, world: int) -> tuple[int, int]:
    """(micro-batch, grad accumulation) that keep ``global_batch`` on ``world`` processes: the configured
    micro-batch if it divides the share of a process, else the largest smaller one that does (memory never
    grows). Refuses in one line naming the world sizes that would keep it."""
    share, rest = divmod(global_batch, world)
    if rest == 0:
        micro = next(m for m in range(min(micro_batch, share), 0, -1) if share % m == 0)
        return micro, share // micro
    fits = [w for w in range(1, global_batch + 1) if global_batch % w == 0]
    raise ConfigError(
        f"resume: the run's global batch of {global_batch} samples cannot be split over {world} processes; "
        f"world sizes that keep it: {', '.join(map(str, fits))}"
    )


def missing_paths(cfg: TrainConfig) -> list[str]:
    """The files and folders ``cfg`` names that do not exist (``train --dry-run``): one line each."""
    named: dict[str, str | None] = {
        "model.llm_path": cfg.model.llm_path,
        **{f"model.{k}": v for k, v in cfg.model.weight_paths().items()},
        "tokenizer": cfg.tokenizer,
        "init_from": cfg.init_from,
        "eval.shards": cfg.eval.shards,
    }
    if cfg.data.shards:
        named["data.shards"] = cfg.data.shards
    named.update({f"data.datasets[{i}].shards": s.shards for i, s in enumerate(cfg.data.datasets)})
    zero = Path(cfg.zero_config)  # as train.engine finds it: as given, else in the repository
    if not zero.is_file() and not (Path(__file__).resolve().parents[1] / zero).is_file():
        named["zero_config"] = cfg.zero_config
    return [f"{k}: {v!r} does not exist" for k, v in named.items() if v and not Path(v).exists()]


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS)


def check_rerun(cfg: TrainConfig, run_dir: str | Path) -> None:
    """Refuse to continue the run in ``run_dir`` with settings other than its own (see RESUMABLE_KEYS).

    Keys absent from the saved config (a field added since) are not compared.
    """
    saved_file = Path(run_dir) / CONFIG
    if not saved_file.is_file():
        return
    saved = flatten(yaml.safe_load(saved_file.read_text()) or {})
    now = flatten(to_dict(cfg))
    changed = [k for k in now if k in saved and saved[k] != now[k] and not _resumable(k)]
    if changed:
        diff = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise ConfigError(
            f"run_dir {str(run_dir)!r} holds a run with other settings ({diff}); a rerun continues it, so "
            f"only {', '.join(k.rstrip('.') + ('*' if k.endswith('.') else '') for k in RESUMABLE_KEYS)} "
            "may change (and the number of GPUs and nodes): use another run_dir for new settings"
        )
