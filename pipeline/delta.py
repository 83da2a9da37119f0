"""Delta weights -> a usable LLM: ``target = base + delta``, tensor by tensor (FastChat's ``apply_delta``).

    python cli.py apply-delta --base models/llama-13b --delta models/vicuna-13b-delta-v0 --target models/vicuna-13b

The LLaMA-1-era Vicuna was released only as a delta against LLaMA. The semantics are FastChat's
(``fastchat/model/apply_delta.py``): every tensor of the target is the base tensor plus the delta tensor
of the same name; the tokenizer and ``config.json`` are the delta's. Vicuna v0 added a pad token, so its
embedding matrices (``embed_tokens``, ``lm_head``) have one row more than LLaMA's: as FastChat v0 did, the
base is extended with zero rows, so an added row is the delta's row.

Unlike FastChat it streams: one delta shard at a time is read, added to the base tensors it names (read
from the base's shards by name, memory-mapped), and written as one safetensors shard of the target, so
peak memory stays near the largest shard instead of the whole model in fp16 (26 GB for 13B). The sums are
computed in float32 and stored in the delta's dtype. Everything that can be refused (another architecture,
missing tensors, shapes) is checked from the headers before anything is written.
"""

from __future__ import annotations

import json
import resource
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# config.json keys two checkpoints of the same architecture agree on (vocab_size may grow in a delta)
ARCH_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
# tensors whose first dimension is the vocabulary: a delta may add rows (Vicuna v0's pad token)
VOCAB_ROWS = ("embed_tokens.weight", "lm_head.weight")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class DeltaError(ValueError):
    """A base/delta pair that cannot be combined; the message says which tensor or key and why."""


@dataclass
class DeltaReport:
    tensors: int
    shards: int
    added_rows: dict[str, int]  # vocabulary tensors the delta grew, and by how many rows
    model_bytes: int  # the target's tensor bytes
    largest_shard_bytes: int  # the largest delta shard (tensor bytes)
    peak_rss_bytes: int  # the process's peak resident memory at the end

    def __str__(self) -> str:
        mb = 1 << 20
        rows = ", ".join(f"{k} +{v}" for k, v in self.added_rows.items()) or "none"
        return (
            f"{self.tensors} tensors in {self.shards} shard(s), {self.model_bytes / mb:.1f} MB "
            f"(largest shard {self.largest_shard_bytes / mb:.1f} MB); rows added: {rows}\n"
            f"peak RSS {self.peak_rss_bytes / mb:.1f} MB"
        )


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far: Linux's VmHWM (getrusage's ru_maxrss survives
    exec, so a process started by a big parent would report the parent's peak)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux, bytes on macOS


def _config(folder: Path, what: str) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise DeltaError(f"--{what} {str(folder)!r} is not a Hugging Face model folder (no config.json)")
    return json.loads(path.read_text())


def weight_map(folder: Path, what: str) -> dict[str, Path]:
    """Tensor name -> the file holding it, from the index file or the single weights file."""
    for index in INDEX_FILES:
        if (folder / index).is_file():
            names = json.loads((folder / index).read_text())["weight_map"]
            return {k: folder / v for k, v in names.items()}
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            with _open(folder / single) as f:
                return dict.fromkeys(f.names(), folder / single)
    raise DeltaError(f"--{what} {str(folder)!r} holds no model.safetensors, pytorch_model.bin or index")


class _TorchFile:
    """A ``.bin`` state dict behind safe_open's interface (memory-mapped, so reading is lazy)."""

    def __init__(self, path: Path):
        self.sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)

    def names(self) -> list[str]:
        return list(self.sd)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.sd[name]

    def shape(self, name: str) -> list[int]:
        return list(self.sd[name].shape)


class _SafeFile:
    def __init__(self, handle):
        self.handle = handle

    def names(self) -> list[str]:
        return list(self.handle.keys())

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.handle.get_tensor(name)

    def shape(self, name: str) -> list[int]:
        return list(self.handle.get_slice(name).get_shape())


@contextmanager
def _open(path: Path) -> Iterator[_SafeFile | _TorchFile]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            yield _SafeFile(f)
    else:
        f = _TorchFile(path)
        yield f
        del f.sd


def _shapes(wmap: dict[str, Path]) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for path in dict.fromkeys(wmap.values()):
        with _open(path) as f:
            shapes.update({k: f.shape(k) for k in f.names()})
    return shapes


def _skip(name: str) -> bool:
    return name.endswith("rotary_emb.inv_freq")  # a buffer older checkpoints saved; rebuilt on load


def check_pair(base: Path, delta: Path) -> tuple[dict[str, Path], dict[str, Path], dict[str, int]]:
    """Refuse (one line) what cannot be combined; returns both weight maps and the added rows per tensor."""
    bcfg, dcfg = _config(base, "base"), _config(delta, "delta")
    for key in ARCH_KEYS:
        if bcfg.get(key) != dcfg.get(key):
            raise DeltaError(
                f"base and delta are different architectures: {key} {bcfg.get(key)!r} (base) vs "
                f"{dcfg.get(key)!r} (delta); the delta must be made from this base model"
            )
    bmap, dmap = weight_map(base, "base"), weight_map(delta, "delta")
    bmap = {k: v for k, v in bmap.items() if not _skip(k)}
    dmap = {k: v for k, v in dmap.items() if not _skip(k)}
    if missing := sorted(set(dmap) ^ set(bmap)):
        side = "base" if missing[0] in dmap else "delta"
        raise DeltaError(
            f"{len(missing)} tensor(s) are in one model only, e.g. {missing[0]!r} is missing from the {side}"
        )
    bshape, dshape = _shapes(bmap), _shapes(dmap)
    added: dict[str, int] = {}
    for name, ds in dshape.items():
        bs = bshape[name]
        grows = name.endswith(VOCAB_ROWS) and len(bs) == len(ds) == 2 and bs[1] == ds[1] and ds[0] > bs[0]
        if grows:
            added[name] = ds[0] - bs[0]
        elif bs != ds:
            raise DeltaError(f"tensor {name!r} has shape {bs} in the base but {ds} in the delta")
    return bmap, dmap, added


def _target_tensor(base_t: torch.Tensor, delta_t: torch.Tensor) -> torch.Tensor:
    out = delta_t.to(torch.float32)  # a copy: the delta file stays untouched
    out[: base_t.shape[0]] += base_t.to(torch.float32)  # added vocabulary rows: base taken as zero
    return out.to(delta_t.dtype)


def apply_delta(base: str | Path, delta: str | Path, target: str | Path) -> DeltaReport:
    """Write ``target`` (safetensors shards + index, the delta's config and tokenizer) = base + delta."""
    base, delta, target = Path(base), Path(delta), Path(target)
    if target.resolve() in (base.resolve(), delta.resolve()):
        raise DeltaError("--target must be a new folder, not the base or the delta")
    bmap, dmap, added = check_pair(base, delta)
    target.mkdir(parents=True, exist_ok=True)
    delta_files = list(dict.fromkeys(dmap.values()))
    n = len(delta_files)
    index: dict[str, str] = {}
    total = largest = 0
    for i, dfile in enumerate(delta_files, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
        shard: dict[str, torch.Tensor] = {}
        with ExitStack() as stack:
            d = stack.enter_context(_open(dfile))
            handles = {}
            for key in (k for k in d.names() if not _skip(k)):
                bfile = bmap[key]
                if bfile not in handles:
                    handles[bfile] = stack.enter_context(_open(bfile))
                shard[key] = _target_tensor(handles[bfile].get_tensor(key), d.get_tensor(key))
        size = sum(t.numel() * t.element_size() for t in shard.values())
        total, largest = total + size, max(largest, size)
        save_file(shard, str(target / name), metadata={"format": "pt"})
        index.update(dict.fromkeys(shard, name))
        del shard
    if n > 1:
        meta = {"metadata": {"total_size": total}, "weight_map": index}
        (target / "model.safetensors.index.json").write_text(json.dumps(meta, indent=2))
    _copy_non_weights(delta, target)
    return DeltaReport(len(index), n, added, total, largest, peak_rss_bytes())


def _copy_non_weights(delta: Path, target: Path) -> None:
    """The delta's config.json, generation config and tokenizer files (FastChat saves the delta's tokenizer)."""
    for f in delta.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in INDEX_FILES:
            shutil.copy2(f, target / f.name)
