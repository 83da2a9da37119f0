"""Per-GPU memory of a training config under DeepSpeed ZeRO-2, and the largest micro-batch that fits.

    python cli.py plan --config configs/stage1_vit-g_7b.yaml --gpus 8 --gpu-memory 80

Everything is counted from the config's sizes (nothing is built), in bytes per GPU, with N the
data-parallel GPUs, Ψ the trainable parameters and p the bytes of the compute dtype (bf16: 2, fp32: 4):

* **frozen weights**: every frozen parameter at the dtype it is held in (bf16 run: 2 B; a 7B LLM is
  13.5 GB). The ViT + image Q-Former count only when training from frames: with cached features they
  are never loaded (train.loop drops them).
* **trainable states** (ZeRO-2): the weights in the compute dtype on every GPU (pΨ); fp32 master
  weights, fp32 gradients and Adam's two moments partitioned (16Ψ/N); DeepSpeed's gradient buckets,
  ``reduce_bucket_size`` elements in the compute dtype, twice with ``overlap_comm`` (on GPU).
* **activations per sample** (what autograd keeps for backward; the LLM is frozen, so the input of a
  frozen Linear is never saved, only what the gradient *to the video tokens* needs). S tokens, an
  LLM of L layers, hidden h, MLP width i, a heads, vocabulary V; 2-byte activations:

      per LLM layer   S·(16h + 6i + 4a + 4) + 2S²   two RMSNorms keep an fp32 copy of their input
                                                    (2·4h) + rstd; SDPA keeps q, k, v, out (4·2h) +
                                                    logsumexp (4a); SiLU keeps gate, the product gate
                                                    and up (3·2i); the [S,S] padding mask (2S²)
      LLM head        S·(4h + 4 + 6V)               final norm (4h + 4), log-softmax in fp32 (4V), the
                                                    bf16 logits the output holds (2V)
      checkpointed    L·S·2h + one layer + head     ``model.llm_gradient_checkpointing``: each layer keeps
                                                    only its input; one layer is recomputed at a time
      video Q-Former  per layer: p·(2Kd + 2nQK + 2nQ² + 12Qd + 2Qf) (K = frames·32 frame tokens,
                                                    Q video queries, d width, f FFN, n heads: cross-attn
                                                    keys/values and probabilities, Linear/LN inputs)
      frozen encoder  from frames only, no grad, transient: frames·257·(4w + 2m)·2 + frames·heads·257²·2

  The LLM terms are checked against the tensors autograd actually saves (tests/test_plan.py).
* **reserve**: CUDA context, NCCL buffers and allocator fragmentation, ``reserve_gb`` (default 3 GB).

S is ``1 + num_video_query_tokens + data.max_caption_tokens`` for stage 1 (captions) and
``data.max_len`` for stage 2 (conversations; the longest batch sets the padded length).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.model import ModelConfig
from train.config import TrainConfig

GB = 1e9
IMAGE_TOKENS = 257  # ViT-g at 224 px: 16x16 patches + CLS (the cached frame's tokens into the Q-Former)


@dataclass
class ParamCounts:
    """Parameters of each part, from the sizes alone (matches the modules; tests/test_plan.py)."""

    vision: int
    image_qformer: int
    llm: int
    trainable: int


def _qformer_layer(d: int, f: int, cross_kv_dim: int | None) -> int:
    attn = 4 * (d * d + d) + 2 * d  # q, k, v, out + LayerNorm
    cross = 0 if cross_kv_dim is None else 2 * (d * d + d) + 2 * (cross_kv_dim * d + d) + 2 * d
    ffn = d * f + f + f * d + d + 2 * d
    return attn + cross + ffn


def _qformer(d: int, f: int, layers: int, every: int, kv_dim: int) -> int:
    """Blip2QFormerModel: layernorm + layers; cross-attention every ``every`` layers (query path only)."""
    return 2 * d + sum(_qformer_layer(d, f, kv_dim if n % every == 0 else None) for n in range(layers))


def param_counts(cfg: ModelConfig) -> ParamCounts:
    w, m = cfg.vision_width, cfg.vision_mlp
    patches = (cfg.image_size // cfg.patch_size) ** 2
    vit_layer = 4 * w + (3 * w * w + 3 * w) + (w * w + w) + (w * m + m) + (m * w + w)
    vision = (3 * cfg.patch_size**2 * w + w) + w + (patches + 1) * w + cfg.vision_layers * vit_layer + 2 * w
    d = cfg.feature_dim
    image_qformer = _qformer(d, cfg.qformer_ffn, cfg.qformer_layers, cfg.qformer_cross_every, w)
    image_qformer += cfg.num_query_tokens * d
    h, i, v = cfg.llm_hidden_size, cfg.llm_intermediate_size, cfg.llm_vocab_size
    llm = 2 * v * h + h + cfg.llm_layers * (4 * h * h + 3 * h * i + 2 * h)
    video = _qformer(d, cfg.video_qformer_ffn, cfg.video_qformer_layers, 1, d)
    trainable = video + cfg.num_video_query_tokens * d + cfg.max_frames * d + d * h + h
    return ParamCounts(vision, image_qformer, llm, trainable)


def llm_layer_bytes(cfg: ModelConfig, seq: int) -> int:
    """What one LLM layer keeps for backward, one sample of ``seq`` tokens (module docstring)."""
    h, i, a = cfg.llm_hidden_size, cfg.llm_intermediate_size, cfg.llm_heads
    return seq * (16 * h + 6 * i + 4 * a + 4) + 2 * seq * seq


def llm_saved_bytes(cfg: ModelConfig, seq: int, checkpointing: bool) -> int:
    """Bytes autograd keeps through the forward (plus the logits the output holds), one sample."""
    head = seq * (4 * cfg.llm_hidden_size + 4 + 6 * cfg.llm_vocab_size)
    if checkpointing:
        return cfg.llm_layers * seq * 2 * cfg.llm_hidden_size + head
    return cfg.llm_layers * llm_layer_bytes(cfg, seq) + head


def llm_activation_bytes(cfg: ModelConfig, seq: int, checkpointing: bool) -> int:
    """Peak activation bytes of one sample: with checkpointing, one layer is recomputed at a time."""
    recompute = llm_layer_bytes(cfg, seq) if checkpointing else 0
    return llm_saved_bytes(cfg, seq, checkpointing) + recompute


def video_activation_bytes(cfg: ModelConfig, frames: int, dtype_bytes: int) -> int:
    d, f, n = cfg.feature_dim, cfg.video_qformer_ffn, cfg.video_qformer_heads
    q, k = cfg.num_video_query_tokens, frames * cfg.num_query_tokens
    per_layer = 2 * k * d + 2 * n * q * k + 2 * n * q * q + 12 * q * d + 2 * q * f
    return dtype_bytes * (k * d + cfg.video_qformer_layers * per_layer)


def encoder_workspace_bytes(cfg: ModelConfig, frames: int) -> int:
    """Transient memory of the frozen ViT on one clip (no grad: one layer's tensors at a time)."""
    tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
    return frames * tokens * (4 * cfg.vision_width + 2 * cfg.vision_mlp) * 2 + frames * cfg.vision_heads * (
        tokens * tokens * 2
    )


def sequence_length(cfg: ModelConfig, task: str, max_caption_tokens: int, max_len: int) -> int:
    return 1 + cfg.num_video_query_tokens + max_caption_tokens if task == "caption" else max_len


@dataclass
class MemoryPlan:
    """Bytes per GPU; ``activations_*`` are per sample. Read with ``format_plan``."""

    gpus: int
    precision: str
    input: str
    seq_len: int
    frames: int
    params: ParamCounts
    frozen_weights: int
    trainable_weights: int
    optimizer_states: int  # fp32 master + Adam moments, this GPU's partition
    gradients: int  # fp32 gradient partition
    buckets: int
    reserve: int
    activations: int  # per sample, without LLM checkpointing
    activations_checkpointed: int  # per sample, with
    checkpoint_bytes: int  # one checkpoint: fp32 master weights + Adam moments, 12 B/param, whole

    @property
    def fixed(self) -> int:
        parts = (self.frozen_weights, self.trainable_weights, self.optimizer_states, self.gradients)
        return sum(parts) + self.buckets + self.reserve

    def total(self, micro_batch: int, checkpointing: bool) -> int:
        per = self.activations_checkpointed if checkpointing else self.activations
        return self.fixed + micro_batch * per

    def max_micro_batch(self, gpu_bytes: float, checkpointing: bool) -> int:
        per = self.activations_checkpointed if checkpointing else self.activations
        return max(0, math.floor((gpu_bytes - self.fixed) / per))


def plan_memory(
    cfg: ModelConfig,
    *,
    gpus: int = 1,
    precision: str = "bf16",
    input: str = "features",
    seq_len: int = 65,
    frames: int = 8,
    reduce_bucket_size: int = 200_000_000,
    overlap_comm: bool = True,
    reserve_gb: float = 3.0,
) -> MemoryPlan:
    """The memory model of the module docstring for one GPU of ``gpus``."""
    p = 2 if precision == "bf16" else 4
    counts = param_counts(cfg)
    llm_bytes = 2 if precision == "bf16" or cfg.llm_dtype != "float32" else 4
    frozen = counts.llm * llm_bytes
    if input == "frames":
        vision_bytes = 2 if precision == "bf16" or cfg.vision_dtype != "float32" else 4
        frozen += counts.vision * vision_bytes + counts.image_qformer * p
    psi, n = counts.trainable, gpus
    video = video_activation_bytes(cfg, frames, p)
    encoder = encoder_workspace_bytes(cfg, frames) if input == "frames" else 0
    return MemoryPlan(
        gpus=gpus,
        precision=precision,
        input=input,
        seq_len=seq_len,
        frames=frames,
        params=counts,
        frozen_weights=frozen,
        trainable_weights=p * psi,
        optimizer_states=12 * math.ceil(psi / n),
        gradients=4 * math.ceil(psi / n),
        buckets=reduce_bucket_size * p * (2 if overlap_comm else 1),
        reserve=int(reserve_gb * GB),
        activations=llm_activation_bytes(cfg, seq_len, False) + video + encoder,
        activations_checkpointed=llm_activation_bytes(cfg, seq_len, True) + video + encoder,
        checkpoint_bytes=12 * psi,
    )


def plan_for_config(
    train_cfg: TrainConfig, gpus: int, on_gpu: bool = True, input: str | None = None
) -> MemoryPlan:
    """``plan_memory`` for a TrainConfig: sequence length, frames, precision and ZeRO buckets from it."""
    mcfg = train_cfg.model  # the preset with the config's keys over it, resolved
    d = train_cfg.data
    precision = train_cfg.precision if train_cfg.precision != "auto" else ("bf16" if on_gpu else "fp32")
    zero = _zero_settings(train_cfg.zero_config)
    return plan_memory(
        mcfg,
        gpus=gpus,
        precision=precision,
        input=input or ("frames" if d.input == "frames" else "features"),
        seq_len=sequence_length(mcfg, d.task, d.max_caption_tokens, d.max_len),
        frames=max(s.num_frames for s in d.specs()) if d.specs() else d.num_frames,
        reduce_bucket_size=int(zero.get("reduce_bucket_size", 500_000_000)),
        overlap_comm=on_gpu and bool(zero.get("overlap_comm", False)),
    )


def _zero_settings(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        file = Path(__file__).resolve().parents[1] / path
    return json.loads(file.read_text()).get("zero_optimization", {}) if file.is_file() else {}


def _gb(n: float) -> str:
    return f"{n / GB:,.2f} GB"


def format_plan(plan: MemoryPlan, gpu_gb: float, micro_batch: int, checkpointing: bool) -> str:
    c = plan.params
    per, per_ck = plan.activations, plan.activations_checkpointed
    lines = [
        f"ZeRO-2 on {plan.gpus} GPU(s) of {gpu_gb:g} GB, {plan.precision}, input {plan.input}, "
        f"{plan.frames} frames, {plan.seq_len} tokens per sample",
        f"  frozen weights          {_gb(plan.frozen_weights):>12}   LLM {c.llm:,} params"
        + (f" + ViT {c.vision:,} + image Q-Former {c.image_qformer:,}" if plan.input == "frames" else ""),
        f"  trainable weights       {_gb(plan.trainable_weights):>12}   {c.trainable:,} params, on every GPU",
        f"  optimizer (fp32+Adam)   {_gb(plan.optimizer_states):>12}   12 B/param / {plan.gpus} GPUs",
        f"  gradients (fp32)        {_gb(plan.gradients):>12}   4 B/param / {plan.gpus} GPUs",
        f"  ZeRO gradient buckets   {_gb(plan.buckets):>12}",
        f"  reserve (CUDA, NCCL)    {_gb(plan.reserve):>12}",
        f"  activations per sample  {_gb(per):>12}   without LLM checkpointing",
        f"                          {_gb(per_ck):>12}   with model.llm_gradient_checkpointing",
        f"  checkpoint on disk      {_gb(plan.checkpoint_bytes):>12}   whole run, frozen weights excluded",
    ]
    for ck in (False, True):
        best = plan.max_micro_batch(gpu_gb * GB, ck)
        lines.append(
            f"largest micro-batch {'with' if ck else 'without'} LLM checkpointing: {best} "
            f"(micro_batch {micro_batch}: {_gb(plan.total(micro_batch, ck))}, "
            f"{'fits' if plan.total(micro_batch, ck) <= gpu_gb * GB else 'DOES NOT FIT'})"
        )
    active = "with" if checkpointing else "without"
    lines.append(f"this config runs {active} LLM checkpointing (model.llm_gradient_checkpointing)")
    return "\n".join(lines)


def train_flops_per_sample(
    cfg: ModelConfig, seq: int, frames: int, input: str = "features", checkpointing: bool = False
) -> dict[str, int]:
    """FLOPs of one training sample (multiply-add = 2), by part; what MFU divides by.

    * LLM (frozen): forward 2·P·S for its matrices (P = L(4h² + 3hi) + hV with the LM head) plus
      4·L·S²·h for the attention products; backward computes only input gradients (no weight
      gradients for frozen weights): 1x the matrices, 2x the attention products; checkpointing
      recomputes the layers' forward once more.
    * video Q-Former + projection (trained): forward x 3 (input and weight gradients).
    * frozen encoder, from frames only (no grad): ViT-g forward on frames·257 tokens + image Q-Former.
    """
    h, i, n, v = cfg.llm_hidden_size, cfg.llm_intermediate_size, cfg.llm_layers, cfg.llm_vocab_size
    layers_lin = 2 * n * (4 * h * h + 3 * h * i) * seq
    head_lin = 2 * h * v * seq
    attn = 4 * n * seq * seq * h
    llm = 2 * (layers_lin + head_lin) + 3 * attn + ((layers_lin + attn) if checkpointing else 0)
    d, f, q = cfg.feature_dim, cfg.video_qformer_ffn, cfg.num_video_query_tokens
    k = frames * cfg.num_query_tokens
    per_layer = 2 * (6 * d * d * q + 2 * d * d * k + 2 * d * f * q) + 4 * q * q * d + 4 * q * k * d
    video = 3 * (cfg.video_qformer_layers * per_layer + 2 * d * h * q)
    out = {"llm": llm, "video": video, "encoder": 0}
    if input == "frames":
        w, m, t = cfg.vision_width, cfg.vision_mlp, (cfg.image_size // cfg.patch_size) ** 2 + 1
        vit = cfg.vision_layers * (2 * t * (4 * w * w + 2 * w * m) + 4 * t * t * w)
        qi, fi = cfg.num_query_tokens, cfg.qformer_ffn
        crosses = -(-cfg.qformer_layers // cfg.qformer_cross_every)
        qformer = cfg.qformer_layers * (2 * qi * (4 * d * d + 2 * d * fi) + 4 * qi * qi * d)
        qformer += crosses * (2 * qi * 2 * d * d + 2 * t * 2 * w * d + 4 * qi * t * d)
        out["encoder"] = frames * (vit + qformer)
    return out
