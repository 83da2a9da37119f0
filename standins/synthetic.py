"""Random weights of real sizes, written as the folders users already have, without any download.

* ``write_llama``: a Hugging Face LLaMA directory (sharded safetensors in the LLM dtype, ``config.json``,
  and a LLaMA-convention tokenizer of exactly ``llm_vocab_size`` tokens, so ``<ImageHere>`` gets id
  32,000 beyond a 32,000-row embedding, as with Vicuna-7B);
* ``write_blip2``: a Hugging Face BLIP-2 folder holding the frozen encoder (``vision_model.*``,
  ``qformer.*``, ``query_tokens``) that ``model.blip2_path`` loads.

Used by the CPU dress rehearsal and the GPU benchmark. The weights have the scale of trained
checkpoints (matrices and biases N(0, 0.02), norm weights 1), never transformers' default
``Blip2VisionConfig.initializer_range`` of 1e-10, which is 0 in fp16 and would hide every dtype seam.
Tensors are made and written one shard at a time, so a 7B folder needs a few GB of RAM, not 14.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.model import FrozenEncoder, ModelConfig, llama_config, torch_dtype
from pipeline.tiny import tiny_tokenizer
from pipeline.weights import hf_blip2_name

STD = 0.02
SHARD_BYTES = 2 << 30
INDEX_FILE = "model.safetensors.index.json"


POOL = 16_777_259  # a prime: tiles of it never line up with a power-of-two row length


class RandomSource:
    """N(0, STD) values drawn once (one pool per dtype) and handed out from random offsets: a 7B folder
    in minutes on two cores instead of drawing 6.7B normals. Rows are distinct (the pool length is a
    prime) and the statistics are a real draw's; the weights only need a realistic scale."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.pools: dict[torch.dtype, torch.Tensor] = {}

    def normal(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self.pools:
            self.pools[dtype] = torch.randn(POOL, generator=self.gen).mul_(STD).to(dtype)
        pool, n = self.pools[dtype], torch.Size(shape).numel()
        start = int(torch.randint(0, POOL, (1,), generator=self.gen))
        reps = -(-(start + n) // POOL)
        flat = pool.repeat(reps)[start : start + n] if reps > 1 else pool[start : start + n].clone()
        return flat.view(shape)


def realistic_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, source: RandomSource):
    """A norm's weight is 1 (as trained norms are, near enough); everything else is N(0, STD)."""
    if len(shape) == 1 and name.endswith("weight") and "norm" in name.lower():
        return torch.ones(shape, dtype=dtype)
    return source.normal(shape, dtype)


def write_random_weights(
    shapes: Iterable[tuple[str, tuple[int, ...], torch.dtype]], out_dir: Path, seed: int = 0
) -> int:
    """Sharded safetensors + index, one shard in memory at a time; returns the bytes written."""
    source = RandomSource(seed)
    shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
    size = 0
    for name, shape, dtype in shapes:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape, dtype))
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: realistic_tensor(name, shape, dtype, source) for name, shape, dtype in shard}
        save_file(tensors, str(out_dir / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.itemsize for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    (out_dir / INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total


def llama_tokenizer(vocab_size: int):
    """The tiny BPE tokenizer padded with unused tokens to exactly ``vocab_size`` entries (LLaMA: 32,000)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tiny_tokenizer().backend_tokenizer.to_str())
    vocab = dict(spec["model"]["vocab"])
    vocab.update({f"<unused_{i}>": i for i in range(len(vocab), vocab_size)})
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    backend = Tokenizer.from_str(json.dumps(spec))
    backend.model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )
    if len(tok) != vocab_size:
        raise RuntimeError(f"tokenizer has {len(tok)} tokens, wanted {vocab_size}")
    return tok


def write_llama(out_dir: str | Path, cfg: ModelConfig, seed: int = 0) -> Path:
    """A LLaMA directory of ``cfg``'s llm_* sizes in ``cfg.llm_dtype`` (7B: 13.5 GB in bf16)."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = llama_config(cfg)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    with torch.device("meta"):
        shapes = AutoModelForCausalLM.from_config(config).state_dict()
    dtype = torch_dtype(cfg.llm_dtype)
    write_random_weights(((k, tuple(v.shape), dtype) for k, v in shapes.items()), out, seed)
    config.dtype = cfg.llm_dtype
    config.save_pretrained(out)
    llama_tokenizer(cfg.llm_vocab_size).save_pretrained(out)
    return out


def write_blip2(out_dir: str | Path, cfg: ModelConfig, seed: int = 0) -> Path:
    """The frozen encoder of ``cfg`` as a Hugging Face BLIP-2 folder, each tensor in the model's dtype."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        sd = FrozenEncoder(cfg).state_dict()
    write_random_weights(((hf_blip2_name(k), tuple(v.shape), v.dtype) for k, v in sd.items()), out, seed)
    return out


@torch.no_grad()
def realistic_(module: torch.nn.Module) -> torch.nn.Module:
    """Re-draw a built module's parameters in place, on its device (from the global seed), with
    ``realistic_tensor``'s rule: norm weights 1, everything else N(0, STD)."""
    for name, p in module.named_parameters():
        if p.ndim == 1 and name.endswith("weight") and "norm" in name.lower():
            p.fill_(1.0)
        else:
            p.normal_(0.0, STD)
    return module


def write_tiny_llm(out_dir: str | Path, hidden_size: int = 64, seed: int = 0) -> Path:
    """Save a random 2-layer Llama and the tiny tokenizer as a Hugging Face directory (``llm_path``).

    The LLM vocabulary is the tokenizer's base vocabulary, so ``<ImageHere>`` (added later) falls
    outside it exactly as id 32000 does on LLaMA.
    """
    out = Path(out_dir)
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
