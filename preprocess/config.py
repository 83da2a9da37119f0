"""The preprocessing stage's typed config (YAML file and/or CLI flags, ``key=value`` overrides)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, get_args

from pipeline.captions import CaptionCleaning
from pipeline.config import MAX_FRAMES, ConfigError, WeightPaths, fingerprint

# Ray refuses a smaller object store (ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES)
OBJECT_STORE_MIN_MB = 75
# The decoder child's address space (RLIMIT_AS = decode_memory_mb), measured on a 596x336 H.264 clip:
# its libraries alone need 300-340 MB (below, every row fails as decode_error: "failed to map segment"):
# PyAV 18.1.0 took 320 MB, 18.1.1 (more codec libraries in its wheel) 340, about 30 MB more mapped after
# `import numpy, decord, av`; the sampled frames take about 4x their size on top (8 frames at 2048 px
# failed under 600 MB and decoded under 1000; at 4096 px failed under 1000, decoded under 2000).
DECODER_BASE_MB = 340
DECODER_FRAME_FACTOR = 4


def decoder_memory_mb(num_frames: int, views: int, size: int) -> float:
    """The least decode_memory_mb a clip of these frames can decode under (see DECODER_BASE_MB)."""
    return DECODER_BASE_MB + DECODER_FRAME_FACTOR * num_frames * views * size * size * 3 / 2**20


Dataset = Literal[
    "webvid", "cc_sbu_align", "llava", "videochat", "panda70m", "internvid", "openvid", "manifest", "folder"
]
DATASETS: tuple[str, ...] = get_args(Dataset)  # what --annotations may hold (cli.py's --dataset choices)


@dataclass
class FeatureCacheConfig(WeightPaths):
    """The frozen ViT + ln_vision + image Q-Former run on the sampled frames (``--cache-features``);
    its weights: ``blip2_path`` or ``eva_vit_path`` + ``qformer_lavis_path`` (WeightPaths)."""

    enabled: bool = False
    model: str = "vit-g-7b"  # a pipeline.model preset: its encoder sizes (the LLM part is not built)
    seed: int = 0  # random encoder weights when no path is given (tests, demo)
    keep_frames: bool = True  # store frames beside the features, or features only
    # with views > 1: each view also gets the original's random resized crop (pipeline.augment) before the
    # encoder, so the cache keeps the spatial augmentation too (stored frames stay uncropped)
    crop_views: bool = True
    dtype: Literal["float16", "float32"] = "float16"
    batch_size: int = 8  # clips per encoder forward
    concurrency: int = 1  # encoder actors
    num_gpus: float | None = None  # per actor; default 1 when CUDA is present, else 0
    num_cpus: float = 1.0  # per actor
    # fewer ViT blocks than the preset's (the CPU rehearsal); part of the encoder fingerprint, so a
    # trainer whose model.vision_layers differs refuses the cache
    vision_layers: int | None = None

    def model_config(self):
        from pipeline.config import ConfigError
        from pipeline.model import preset

        cfg = dataclasses.replace(preset(self.model), **self.weight_paths())
        if self.vision_layers is not None:
            if self.vision_layers < 1:
                raise ConfigError("features.vision_layers must be >= 1")
            cfg.vision_layers = self.vision_layers
        cfg.validate()
        return cfg


DEFAULT_SIZE = 224  # the original's frame size (EVA ViT-g/14), used when no encoder says otherwise


@dataclass
class PreprocessConfig:
    # input: WebVid CSV/TSV annotations + videos folder, or a folder of WebDataset tars of videos
    annotations: str | None = None
    videos: str | None = None
    tars: str | None = None
    # what --annotations holds: WebVid CSV/TSV, a stage-2 instruction set (JSON + --images/--videos), a
    # corpus preset (panda70m, internvid: segments; openvid: whole files), a generic manifest
    # (CSV/TSV/JSONL/Parquet + --columns), or "folder": --videos of videos with sidecar NAME.txt captions
    dataset: Dataset = "webvid"
    # manifest column mapping, e.g. "video=path,caption=text,start=t0,end=t1" (also overrides a preset's)
    columns: str | None = None
    images: str | None = None
    output: str = ""
    format: Literal["webdataset", "arrow"] = "webdataset"
    samples_per_shard: int = 256  # input rows per shard; failed rows make a shard smaller
    # frame sampling
    num_frames: int = 8
    sampling: Literal["uniform", "headtail", "random"] = "uniform"
    seed: int = 0
    size: int | None = None  # pixels; default: the encoder's image size with --cache-features, else 224
    resize: Literal["squash", "center_crop"] = "squash"
    min_frames: int | None = None  # clips with fewer frames fail as too_short (default: num_frames)
    views: int = 1  # sampler draws per clip (e.g. 4 headtail views keep the original's augmentation)
    caption: CaptionCleaning = field(default_factory=CaptionCleaning)
    features: FeatureCacheConfig = field(default_factory=FeatureCacheConfig)
    # fault bounds for the decoder subprocess
    decode_timeout_s: float = 60.0
    decode_memory_mb: int = 4096
    decoder_recycle_every: int = 500  # restart the decoder process every N clips (decord leaks)
    # execution
    workers: int | None = None  # local Ray CPUs (default: all cores)
    ray_address: str | None = None  # join an existing Ray cluster instead
    object_store_mb: int | None = None
    limit: int | None = None  # only the first N input rows (smoke runs)
    progress_every_s: float = 5.0
    # stop when the first N rows all fail for one decoding reason (SUSPECT_REASONS): that is the
    # configuration (size, frames, decoder limits), not the videos; 0: never stop
    config_check_rows: int = 32

    def __post_init__(self) -> None:
        """Resolve the default frame size: the one the encoder takes, so ``--cache-features`` needs no
        ``--size`` (a size given explicitly is checked against the encoder in ``validate``)."""
        if self.size is None:
            self.size = self.features.model_config().image_size if self.features.enabled else DEFAULT_SIZE

    def validate(self) -> None:
        if not self.output:
            raise ConfigError("output: an output folder is required (--output DIR)")
        self._validate_inputs()
        max_frames = MAX_FRAMES  # not ModelConfig.max_frames: that import would load torch in the driver
        if not 1 <= self.num_frames <= max_frames:
            raise ConfigError(
                f"num_frames: {self.num_frames} is outside 1..{max_frames} "
                f"(the frame position embedding has {max_frames} rows)"
            )
        if self.samples_per_shard < 1:
            raise ConfigError("samples_per_shard: must be >= 1")
        if self.size < 16:
            raise ConfigError(f"size: {self.size} is too small (>= 16)")
        if self.min_frames is not None and self.min_frames < 1:
            raise ConfigError("min_frames: must be >= 1")
        if self.workers is not None and self.workers < 1:
            raise ConfigError("workers: must be >= 1")
        if self.decode_timeout_s <= 0:
            raise ConfigError("decode_timeout_s: must be > 0")
        if self.views < 1:
            raise ConfigError("views: must be >= 1")
        if self.config_check_rows < 0:
            raise ConfigError("config_check_rows: must be >= 0 (0: never stop early)")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit: {self.limit} must be >= 1 (leave it out for every row)")
        need = decoder_memory_mb(self.num_frames, self.views, self.size)
        if self.decode_memory_mb < need:
            raise ConfigError(
                f"size/decode_memory_mb: {self.num_frames * self.views} frames of {self.size}x{self.size} px "
                f"need about {need:,.0f} MB in the decoder (its libraries alone {DECODER_BASE_MB} MB), more "
                f"than decode_memory_mb={self.decode_memory_mb}: every row would fail as decode_error "
                f"(the original's size is {DEFAULT_SIZE})"
            )
        self.caption.validate()
        if self.features.batch_size < 1:
            raise ConfigError(f"features.batch_size: {self.features.batch_size} must be >= 1")
        if self.features.concurrency < 1:
            raise ConfigError(f"features.concurrency: {self.features.concurrency} must be >= 1")
        if self.object_store_mb is not None and self.object_store_mb < OBJECT_STORE_MIN_MB:
            raise ConfigError(
                f"object_store_mb: {self.object_store_mb} is below Ray's minimum of {OBJECT_STORE_MIN_MB} MB"
            )
        if self.features.enabled:
            image_size = self.features.model_config().image_size
            if image_size != self.size:
                raise ConfigError(
                    f"size: {self.size} but the {self.features.model!r} encoder takes {image_size}x{image_size} "
                    f"frames; set size={image_size}"
                )

    def _validate_inputs(self) -> None:
        if self.dataset in ("cc_sbu_align", "llava"):
            if not (self.annotations and self.images) or self.videos or self.tars:
                raise ConfigError(f"input: dataset={self.dataset} takes --annotations JSON and --images DIR")
            return
        if self.images:
            raise ConfigError(f"images: dataset={self.dataset} reads videos, not --images")
        if self.columns and self.dataset not in ("panda70m", "internvid", "openvid", "manifest"):
            raise ConfigError(
                f"columns: dataset={self.dataset} has fixed columns; --columns is for manifests"
            )
        if self.dataset == "manifest" and not self.columns:
            raise ConfigError(
                "columns: dataset=manifest needs --columns video=COL,caption=COL[,start=COL,end=COL]"
            )
        if self.dataset == "folder":
            if not self.videos or self.annotations or self.tars:
                raise ConfigError(
                    "input: dataset=folder takes only --videos DIR (videos with NAME.txt captions)"
                )
            return
        if self.tars and (self.annotations or self.videos or self.dataset != "webvid"):
            raise ConfigError(
                "give either --tars (WebVid WebDataset tars) or --annotations/--videos, not both"
            )
        if not self.tars and not (self.annotations and self.videos):
            raise ConfigError(
                "input: give --annotations and --videos (WebVid layout) or --tars (WebDataset tars)"
            )

    @property
    def is_image_dataset(self) -> bool:
        return self.dataset in ("cc_sbu_align", "llava")

    @property
    def required_frames(self) -> int:
        return self.min_frames if self.min_frames is not None else self.num_frames

    def output_fingerprint(self) -> str:
        """Hash of everything that changes the shards' contents; a rerun must match it to resume."""
        return fingerprint(
            {
                # the column mapping only when given, so folders written before it existed still resume
                "input": [self.dataset, self.annotations, self.videos, self.images, self.tars, self.limit]
                + ([self.columns] if self.columns else []),
                "format": self.format,
                "samples_per_shard": self.samples_per_shard,
                "frames": [
                    self.num_frames,
                    self.sampling,
                    self.seed,
                    self.size,
                    self.resize,
                    self.required_frames,
                ],
                "caption": vars(self.caption),
                "views": self.views,
                "features": None
                if not self.features.enabled
                else [
                    self.features.model_config().encoder_fingerprint(),
                    self.features.seed,
                    self.features.keep_frames,
                    self.features.dtype,
                ],
            }
        )
