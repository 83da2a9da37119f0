"""Video-LLaMA (vision branch) composed from transformers blocks.

    clip [B,3,T,H,W] -> visual_encoder (EVA ViT-g = Blip2VisionModel, frozen)
                     -> ln_vision (stored as visual_encoder.post_layernorm, frozen)
                     -> qformer + query_tokens (BLIP-2 image Q-Former, frozen)   = features [B,T,32,D]
    features         -> + video_frame_position_embedding -> video_qformer + video_query_tokens
                     -> llama_proj                                                = video tokens [B,32,H]
    video tokens replace the 32 ``<ImageHere>`` embeddings of the prompt -> llm (frozen) -> loss

``features`` is the feature-cache boundary: everything that trains is downstream of it, so a batch may
carry either the raw ``clip`` or cached ``features`` and gives the same loss.

``ln_vision`` lives in the slot of transformers' ``Blip2VisionModel.post_layernorm``, applied to all 257
tokens of the last block (the EVA ViT itself has no final norm), which is where transformers' BLIP-2
conversion puts the ``ln_vision.*`` weights, so the HF BLIP-2 weights load unchanged. That slot is
refilled with the original's module: a plain LayerNorm with torch's default eps 1e-5 (the ViT's own
norms use 1e-6), computed in fp32 (``build_vision_encoder``).

Precision of the frozen ViT as the original's ``convert_weights_to_fp16``: only its Linear/Conv weights
are in ``vision_dtype``; LayerNorms, class/position embeddings and ln_vision stay fp32, so the residual
stream is fp32 and every Linear computes in its weights' dtype (what the original got from fp16
autocast). Casting the whole ViT to fp16 instead moves the features measurably
(``benchmarks/encoder_precision.py``, docs/PERFORMANCE.md).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields
from typing import Literal

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    Blip2VisionConfig,
    Blip2VisionModel,
    LlamaConfig,
)
from transformers.models.blip_2.modeling_blip_2 import Blip2VisionEmbeddings

from pipeline.config import MAX_FRAMES, ConfigError, WeightPaths, fingerprint

DType = Literal["float32", "bfloat16", "float16"]

# The one place that declares what trains. Everything else is frozen and kept in eval mode.
TRAINABLE = ("video_qformer", "video_query_tokens", "video_frame_position_embedding", "llama_proj")


@dataclass
class ModelConfig(WeightPaths):
    """Sizes of every part; the defaults are the original model with a 7B LLM (preset ``vit-g-7b``).

    The frozen-encoder weights (``blip2_path`` or ``eva_vit_path`` + ``qformer_lavis_path``) come from
    :class:`pipeline.config.WeightPaths`."""

    # Frozen vision encoder: EVA ViT-g/14 without its last block, as transformers' Blip2VisionModel.
    image_size: int = 224
    patch_size: int = 14
    vision_width: int = 1408
    vision_layers: int = 39
    vision_heads: int = 16
    vision_mlp: int = 6144
    vision_eps: float = 1e-6
    vision_dtype: DType = "float16"  # the frozen ViT's Linear/Conv weights (norms, embeddings: fp32)
    # Frozen BLIP-2 image Q-Former. Its hidden size is the cached feature dim used everywhere downstream.
    feature_dim: int = 768
    qformer_layers: int = 12
    qformer_heads: int = 12
    qformer_ffn: int = 3072
    qformer_cross_every: int = 2
    num_query_tokens: int = 32
    # Trainable video Q-Former (hidden size = feature_dim, cross-attention in every layer).
    video_qformer_layers: int = 2
    video_qformer_heads: int = 12
    video_qformer_ffn: int = 3072
    num_video_query_tokens: int = 32
    max_frames: int = MAX_FRAMES
    # The frame position embedding's init when a run starts from scratch: "normal" is the original's
    # (nn.Embedding's N(0, 1) per frame, unordered); "sinusoidal" gives neighbouring frames neighbouring
    # codes, which the tiny recipe needs to learn slow moves (docs/LEARNING.md, issue 20).
    frame_position_init: Literal["normal", "sinusoidal"] = "normal"
    dropout: float = 0.1
    # Frozen LLM: a local Hugging Face causal-LM directory, or (llm_path null) a Llama built from the
    # llm_* sizes below with random weights (tests, smoke runs, meta-device counting).
    llm_path: str | None = None
    llm_hidden_size: int = 4096
    llm_dtype: DType = "bfloat16"
    # Recompute the frozen LLM's activations in backward instead of storing them (gradients still flow
    # through it to the video tokens): less memory per sample for 13B, ~1/3 more LLM compute.
    llm_gradient_checkpointing: bool = False
    llm_vocab_size: int = 32000
    llm_layers: int = 32
    llm_heads: int = 32
    llm_intermediate_size: int = 11008

    def validate(self) -> None:
        sizes = [f.name for f in fields(self) if f.type in (int, "int")]
        if bad := [f"{k}={getattr(self, k)}" for k in sizes if getattr(self, k) < 1]:
            raise ConfigError(f"model: sizes must be >= 1: {', '.join(bad)}")
        if not 0 <= self.dropout < 1 or not 0 < self.vision_eps < 1:
            raise ConfigError("model.dropout must be in [0, 1) and model.vision_eps in (0, 1)")
        for width, heads, what in (
            (self.vision_width, self.vision_heads, "vision_width/vision_heads"),
            (self.feature_dim, self.qformer_heads, "feature_dim/qformer_heads"),
            (self.feature_dim, self.video_qformer_heads, "feature_dim/video_qformer_heads"),
            (self.llm_hidden_size, self.llm_heads, "llm_hidden_size/llm_heads"),
        ):
            if width % heads:
                raise ConfigError(f"model.{what}: {width} is not divisible by {heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"model.image_size {self.image_size} is not a multiple of patch_size")
        if self.max_frames < 1 or self.num_video_query_tokens < 1 or self.num_query_tokens < 1:
            raise ConfigError("model.max_frames and the query token counts must be >= 1")
        self.check_weight_paths("model")

    def encoder_fingerprint(self) -> str:
        """Hash of everything that determines cached features, so a cache built differently is refused."""
        keys = [k for k in self.__dataclass_fields__ if k.startswith(("image_", "patch_", "vision_"))]
        keys += ["feature_dim", "qformer_layers", "qformer_heads", "qformer_ffn", "qformer_cross_every"]
        keys += ["num_query_tokens", *self.weight_paths()]
        numerics = {"ln_vision_eps": LN_VISION_EPS, "vit_precision": "linear-conv-only"}
        return fingerprint({**{k: getattr(self, k) for k in keys}, **numerics})


def vit_g(llm: Literal["7b", "13b"] = "7b") -> ModelConfig:
    """The original sizes; the LLM sizes are LLaMA/Vicuna 7B or 13B."""
    if llm == "7b":
        return ModelConfig()
    return ModelConfig(llm_hidden_size=5120, llm_layers=40, llm_heads=40, llm_intermediate_size=13824)


def tiny() -> ModelConfig:
    """A few-hundred-thousand-parameter model with the same structure, for CPU tests and smoke runs."""
    return ModelConfig(
        image_size=56,
        patch_size=7,  # 8x8 patches: a shape in a 56 px frame spans several, so where it is survives
        vision_width=64,
        vision_layers=2,
        vision_heads=4,
        vision_mlp=128,
        vision_dtype="float32",
        feature_dim=64,
        qformer_layers=2,
        qformer_heads=4,
        qformer_ffn=128,
        video_qformer_heads=4,
        video_qformer_ffn=128,
        llm_hidden_size=64,
        llm_dtype="float32",
        llm_vocab_size=1000,
        llm_layers=2,
        llm_heads=4,
        llm_intermediate_size=128,
    )


PRESETS = {"vit-g-7b": lambda: vit_g("7b"), "vit-g-13b": lambda: vit_g("13b"), "tiny": tiny}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]()


def torch_dtype(name: DType) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# Random-init std of the frozen encoder when no weights are loaded (EVA's and BLIP-2's own init).
INIT_STD = 0.02


def vision_config(cfg: ModelConfig) -> Blip2VisionConfig:
    return Blip2VisionConfig(
        hidden_size=cfg.vision_width,
        intermediate_size=cfg.vision_mlp,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        layer_norm_eps=cfg.vision_eps,
        qkv_bias=True,
        initializer_range=INIT_STD,  # transformers' default is 1e-10: a random ViT would be ~0 everywhere
    )


LN_VISION_EPS = 1e-5  # the original's ln_vision = LayerNorm(1408): torch's default eps


class _OwnDtypeEmbeddings(Blip2VisionEmbeddings):
    """EVA's embedding: the patch Conv in its weights' dtype, then class and position embeddings in
    their own (fp32) dtype, as the original's ``x + pos_embed`` promoted (transformers would round them
    to the Conv's dtype). No state of its own: the built module's class is swapped, keys unchanged."""

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        conv = self.patch_embedding
        patches = conv(pixel_values.to(conv.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(len(patches), 1, -1)
        x = torch.cat([cls, patches.to(cls.dtype)], dim=1)
        h, w = pixel_values.shape[-2:]
        pos = self.interpolate_pos_encoding(x, h, w) if interpolate_pos_encoding else self.position_embedding
        return x + pos[:, : x.shape[1]]


def _input_to_weight_dtype(module: nn.Module, args: tuple) -> tuple:
    return (args[0].to(module.weight.dtype), *args[1:])


def build_vision_encoder(cfg: ModelConfig) -> Blip2VisionModel:
    """EVA ViT-g + ln_vision with the original's precision: Linear/Conv weights in ``vision_dtype``,
    everything else fp32, and each Linear/LayerNorm computing in its own weights' dtype."""
    vit = Blip2VisionModel(vision_config(cfg))
    vit.post_layernorm = nn.LayerNorm(cfg.vision_width, eps=LN_VISION_EPS)  # ln_vision (no RNG draw)
    vit.embeddings.__class__ = _OwnDtypeEmbeddings
    for m in vit.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.to(torch_dtype(cfg.vision_dtype))
        if isinstance(m, (nn.Linear, nn.LayerNorm)):
            m.register_forward_pre_hook(_input_to_weight_dtype)
    return vit


def image_qformer_config(cfg: ModelConfig) -> Blip2QFormerConfig:
    return Blip2QFormerConfig(
        hidden_size=cfg.feature_dim,
        num_hidden_layers=cfg.qformer_layers,
        num_attention_heads=cfg.qformer_heads,
        intermediate_size=cfg.qformer_ffn,
        cross_attention_frequency=cfg.qformer_cross_every,
        encoder_hidden_size=cfg.vision_width,
    )


def sinusoidal_positions(n: int, d: int) -> torch.Tensor:
    """``[n, d]`` sine/cosine position codes (Vaswani et al. 2017) scaled to a mean square of 1, the scale
    of nn.Embedding's N(0, 1): code t and t+1 are close and the codes change smoothly with t, so "later
    minus earlier" is one direction in feature space from the first step."""
    t = torch.arange(n, dtype=torch.float32)[:, None]
    angles = t / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    codes = torch.empty(n, d)
    codes[:, 0::2], codes[:, 1::2] = torch.sin(angles), torch.cos(angles[:, : d // 2])
    return codes * math.sqrt(2)


def video_qformer_config(cfg: ModelConfig) -> Blip2QFormerConfig:
    return Blip2QFormerConfig(
        hidden_size=cfg.feature_dim,
        num_hidden_layers=cfg.video_qformer_layers,
        num_attention_heads=cfg.video_qformer_heads,
        intermediate_size=cfg.video_qformer_ffn,
        cross_attention_frequency=1,
        encoder_hidden_size=cfg.feature_dim,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
    )


def llama_config(cfg: ModelConfig) -> LlamaConfig:
    """The Llama of the llm_* sizes (a random LLM when ``llm_path`` is null)."""
    return LlamaConfig(
        vocab_size=cfg.llm_vocab_size,
        hidden_size=cfg.llm_hidden_size,
        intermediate_size=cfg.llm_intermediate_size,
        num_hidden_layers=cfg.llm_layers,
        num_attention_heads=cfg.llm_heads,
    )


def build_llm(cfg: ModelConfig) -> nn.Module:
    """The frozen LLM: loaded from ``llm_path`` (bf16 by default) or a random Llama of the llm_* sizes."""
    dtype = torch_dtype(cfg.llm_dtype)
    if cfg.llm_path:
        llm = AutoModelForCausalLM.from_pretrained(cfg.llm_path, dtype=dtype)
    else:
        llm = AutoModelForCausalLM.from_config(llama_config(cfg), dtype=dtype)
    hidden = llm.config.get_text_config().hidden_size
    if hidden != cfg.llm_hidden_size:
        raise ConfigError(
            f"model.llm_hidden_size is {cfg.llm_hidden_size} but the LLM at {cfg.llm_path} has hidden size "
            f"{hidden} (7B LLaMA: 4096, 13B: 5120)"
        )
    return llm


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_from_frames(frames, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stored uint8 frames ``[..., T, H, W, 3]`` -> CLIP-normalised clip ``[..., 3, T, H, W]``.

    Works on the frames' device, so a loader can move uint8 (4x less to copy) and normalise there."""
    x = torch.as_tensor(frames)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(3, 1, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(3, 1, 1, 1)
    return ((x.movedim(-1, -4).float().div_(255.0) - mean) / std).to(dtype)


def vision_for_device(parts: nn.Module, device: torch.device | str) -> None:
    """On a CPU the frozen ViT computes in fp32: CPUs have no fast fp16 kernels (one ViT-g MLP GEMM ran at
    under 0.1 GFLOP/s in fp16 against 7-18 in fp32 on the project's CPU), and LAVIS's ``load_model``
    likewise calls ``model.float()`` on a CPU. Call it after any content hash: that is of the weights
    as loaded. A no-op on a GPU or without an encoder."""
    if torch.device(device).type == "cpu" and getattr(parts, "visual_encoder", None) is not None:
        parts.visual_encoder.float()


@torch.no_grad()
def encode_frames(parts: nn.Module, clip: torch.Tensor) -> torch.Tensor:
    """ViT + ln_vision + image Q-Former of ``parts`` (a VideoLLaMA or a FrozenEncoder) on a clip."""
    return frame_features(parts, clip)


def frame_features(parts: nn.Module, clip: torch.Tensor) -> torch.Tensor:
    """``encode_frames`` with gradients (only ``standins.tiny_encoder`` trains the frozen part)."""
    b, c, t, h, w = clip.shape
    frames = clip.transpose(1, 2).reshape(b * t, c, h, w)
    frames = frames.to(parts.visual_encoder.embeddings.patch_embedding.weight.dtype)
    tokens = parts.visual_encoder(pixel_values=frames).last_hidden_state  # already ln_vision'd
    queries = parts.query_tokens.expand(b * t, -1, -1)
    out = parts.qformer(query_embeds=queries, encoder_hidden_states=tokens).last_hidden_state
    return out.reshape(b, t, *out.shape[1:]).float()


class FrozenEncoder(nn.Module):
    """Only the frozen vision part, with VideoLLaMA's attribute names (so the same weight loaders apply):
    what the feature cache runs. Without weight paths it is built from ``seed``, so every Ray actor
    holds the same random encoder. With weight paths it is built on the meta device (no memory, no
    random init of a 1B-parameter ViT) and ``pipeline.weights.load_frozen_encoder`` materialises it
    once from the files; used before that, it fails loudly (meta tensors hold no data)."""

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        on_meta = bool(cfg.blip2_path or cfg.eva_vit_path)
        with torch.random.fork_rng(), torch.device("meta") if on_meta else contextlib.nullcontext():
            torch.manual_seed(seed)
            self.visual_encoder = build_vision_encoder(cfg)
            self.qformer = Blip2QFormerModel(image_qformer_config(cfg))
            # BLIP-2's init; zeros would make the 32 queries identical (one pooled vector per frame)
            queries = torch.zeros(1, cfg.num_query_tokens, cfg.feature_dim).normal_(0, INIT_STD)
            self.query_tokens = nn.Parameter(queries)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenEncoder:
        return super().train(False)

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        return encode_frames(self, clip)

    def weights_fingerprint(self) -> str:
        return encoder_weights_fingerprint(self)


ENCODER_PARTS = ("visual_encoder.", "qformer.", "query_tokens")


def encoder_weights_fingerprint(module: nn.Module) -> str:
    """Content hash of the frozen encoder's tensors (of a FrozenEncoder or a VideoLLaMA): a feature
    cache and a model agree on the encoder only if this matches."""
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    for k, v in sorted(module.state_dict().items()):
        if k.startswith(ENCODER_PARTS):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def enable_llm_checkpointing(llm: nn.Module) -> None:
    """Gradient checkpointing for the frozen LLM; refuses LLMs whose train mode would add dropout."""
    text = llm.config.get_text_config()
    drops = {
        k: getattr(text, k) for k in ("attention_dropout", "hidden_dropout", "dropout") if getattr(text, k, 0)
    }
    if drops or any(isinstance(m, nn.Dropout) and m.p > 0 for m in llm.modules()):
        raise ConfigError(
            f"model.llm_gradient_checkpointing needs an LLM without dropout (it has {drops or 'dropout'})"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5 name
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class VideoLLaMA(nn.Module):
    def __init__(self, cfg: ModelConfig, llm: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        d = cfg.feature_dim
        frozen = FrozenEncoder(cfg)  # same random init as the feature cache's when no weights are loaded
        self.visual_encoder, self.qformer, self.query_tokens = (
            frozen.visual_encoder,
            frozen.qformer,
            frozen.query_tokens,
        )
        self.video_frame_position_embedding = nn.Embedding(cfg.max_frames, d)
        if cfg.frame_position_init == "sinusoidal":
            with torch.no_grad():
                self.video_frame_position_embedding.weight.copy_(sinusoidal_positions(cfg.max_frames, d))
        self.video_qformer = Blip2QFormerModel(video_qformer_config(cfg))
        self.video_query_tokens = nn.Parameter(torch.zeros(1, cfg.num_video_query_tokens, d).normal_(0, 0.02))
        self.llama_proj = nn.Linear(d, cfg.llm_hidden_size)
        self.llm = llm if llm is not None else build_llm(cfg)
        if cfg.llm_gradient_checkpointing:
            enable_llm_checkpointing(self.llm)
        self.freeze()

    @property
    def ln_vision(self) -> nn.LayerNorm:
        """The original ``ln_vision`` (eps 1e-5, fp32), in the ``post_layernorm`` slot; see the module docstring."""
        return self.visual_encoder.post_layernorm

    # ---- what trains -------------------------------------------------------------------------
    def freeze(self) -> None:
        """requires_grad only for the TRAINABLE parts, and the frozen parts in eval mode."""
        for name, p in self.named_parameters():
            p.requires_grad_(name.split(".")[0] in TRAINABLE)
        self.train(self.training)

    def train(self, mode: bool = True) -> VideoLLaMA:
        """Frozen parts stay in eval mode (no dropout in the frozen Q-Former) whatever ``mode`` is."""
        super().train(mode)
        for name, child in self.named_children():
            if name not in TRAINABLE:
                # transformers only checkpoints in train mode; enable_llm_checkpointing checked that the
                # LLM has no dropout, so its train mode computes exactly what eval mode does
                child.train(mode and name == "llm" and self.cfg.llm_gradient_checkpointing)
        return self

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if n.split(".")[0] in TRAINABLE]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a trainable-weights export holds (our names; see pipeline.weights)."""
        return {k: v for k, v in self.state_dict().items() if k.split(".")[0] in TRAINABLE}

    def drop_frozen_encoder(self) -> int:
        """Free the ViT + image Q-Former when every batch brings cached features (about 2 GB of fp16
        weights at real size, on every GPU); returns the number of parameters freed."""
        if self.visual_encoder is None:
            return 0
        freed = sum(p.numel() for n, p in self.named_parameters() if n.startswith(ENCODER_PARTS))
        self.visual_encoder, self.qformer, self.query_tokens = None, None, None
        return freed

    # ---- forward -----------------------------------------------------------------------------
    def encode_frames(self, clip: torch.Tensor) -> torch.Tensor:
        """Frozen part: [B,3,T,H,W] -> [B,T,num_query_tokens,feature_dim] (the cache boundary)."""
        if self.visual_encoder is None:
            raise RuntimeError(
                "this model dropped its frozen encoder (trained from cached features): pass features"
            )
        return encode_frames(self, clip)

    def video_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """Trainable part: [B,T,Q,D] frame features -> [B,num_video_query_tokens,llm_hidden_size]."""
        b, t, q, d = features.shape
        if t > self.cfg.max_frames:
            raise ValueError(f"{t} frames but the frame position embedding has {self.cfg.max_frames}")
        pos = self.video_frame_position_embedding(torch.arange(t, device=features.device))
        frames = features.to(pos.dtype) + pos[None, :, None, :]  # frame t's position on all its queries
        frames = frames.reshape(b, t * q, d)
        queries = self.video_query_tokens.expand(b, -1, -1)
        out = self.video_qformer(query_embeds=queries, encoder_hidden_states=frames).last_hidden_state
        return self.llama_proj(out)

    def embed_with_video(
        self, input_ids: torch.Tensor, video_mask: torch.Tensor, video: torch.Tensor
    ) -> torch.Tensor:
        """LLM input embeddings with the ``<ImageHere>`` positions (video_mask) replaced by video tokens.

        The placeholder id may lie outside the LLM vocabulary (the embedding matrix is not resized),
        so those ids are looked up as 0 and overwritten.
        """
        per_row = video_mask.sum(dim=1)
        if not torch.all(per_row == video.shape[1]):
            raise ValueError(f"each row needs {video.shape[1]} video positions, got {per_row.tolist()}")
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(video_mask, 0))
        return embeds.masked_scatter(video_mask.unsqueeze(-1), video.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        video_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        clip: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ):
        """Causal-LM output (``.loss``, ``.logits``) for a batch with either ``clip`` or cached ``features``."""
        if (clip is None) == (features is None):
            raise ValueError("pass exactly one of clip or features")
        if features is None:
            features = self.encode_frames(clip)
        embeds = self.embed_with_video(input_ids, video_mask, self.video_tokens(features))
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, use_cache=False)
