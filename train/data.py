"""The training stream: shards -> per-(rank, worker) sample streams -> one-dataset batches.

Exact resume needs a cursor that is plain data, so the order is fixed by the seed alone:

1. every epoch shuffles each dataset's shard list with ``rng(seed, epoch)``;
2. rank r, DataLoader worker w reads shards ``order[slot::num_slots]`` (slot = r * workers + w), samples
   in file order, epoch after epoch (an endless stream; the run length is counted in steps);
3. each batch comes from one dataset drawn by weight with ``rng(seed, slot, batch number)``; datasets may
   differ in frames per clip (images are 1-frame clips), a batch never mixes them.

Samples that cannot be used are skipped in the slot's own sample stream, before batching, and counted:
``errors`` (unreadable or incomplete samples) and ``too_long`` (conversations whose prompt cannot fit
``data.max_len`` without cutting the video block or every answer). Every batch still has ``micro_batch``
samples, so ranks never disagree about batches, and the cursor counts skipped samples too.

Text, by ``data.task`` (pipeline.prompts builds ids and labels):

* ``caption``: stage 1, ``[BOS] <ImageHere>*32 caption``;
* ``conversation``: stage 2 in ``data.template`` style. Samples with ``meta["conversations"]`` (LLaVA,
  VideoChat) use those turns, labelled by ``data.label_mask``; caption-only samples (cc_sbu_align) take
  the original's ``prompt_wrap`` form: an instruction drawn with ``rng(seed, slot, batch, row)`` from
  ``CAPTION_INSTRUCTIONS`` and the raw caption, as MiniGPT-4 / Video-LLaMA trained them. 1-frame
  samples are images (``<Image>`` block); videos get the ``<Video>`` block and the frame-timestamp
  message from ``meta["timestamps"]``.

The cursor of a slot is ``{"batches": n, "samples": [samples consumed per dataset]}``; a restarted
stream skips that many samples (whole shards by their counts from ``index.parquet``, then within one
shard) and continues exactly where the stopped run was. Each batch carries its slot and the cursor
after it, so the training loop only keeps the latest cursor per slot.

DataLoader hands out batches from workers 0, 1, ... in turn, so after ``n`` batches the next one is
due from worker ``n % workers``: a restarted loader rotates worker ids by that offset.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.augment import random_resized_crop
from pipeline.config import ConfigError
from pipeline.model import ModelConfig
from pipeline.prompts import (
    TextSample,
    caption_sample,
    collate,
    conversation_sample,
    frame_times_message,
    instruction_prompt,
)
from pipeline.shards import (
    INDEX_FILE,
    SAMPLE_NDIM,
    inspect_shards,
    list_shards,
    read_shard,
    read_shard_config,
)

# Questions for caption-only samples in conversation training (the wording of the original's
# prompts/alignment_image.txt, which MiniGPT-4 also used for cc_sbu_align; videos: the same, of a video).
CAPTION_INSTRUCTIONS = {
    "image": (
        "Describe this image in detail.",
        "Take a look at this image and describe what you notice.",
        "Please provide a detailed description of the picture.",
        "Could you describe the contents of this image for me?",
    ),
    "video": (
        "Describe this video in detail.",
        "Take a look at this video and describe what you notice.",
        "Please provide a detailed description of the video.",
        "Could you describe the contents of this video for me?",
    ),
}


# ---- shard sets ------------------------------------------------------------------------------------


def shard_counts(folder: str | Path) -> list[tuple[str, int]]:
    """``[(shard path, samples)]`` of a shard folder: counts from ``index.parquet``, else by reading."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"data: shard folder {str(folder)!r} does not exist")
    shards = list_shards(folder)
    if not shards:
        raise ConfigError(f"data: {str(folder)!r} holds no shard-*.tar / shard-*.arrow files")
    if (folder / INDEX_FILE).is_file():
        import pyarrow.parquet as pq

        rows = pq.read_table(folder / INDEX_FILE, columns=["status", "shard"]).to_pylist()
        ok: dict[str, int] = {}
        for r in rows:
            if r["status"] == "ok":
                ok[r["shard"]] = ok.get(r["shard"], 0) + 1
        return [(str(p), ok.get(p.name, 0)) for p in shards]
    return [(str(p), sum(1 for _ in read_shard(p))) for p in shards]


def adopt_cached_encoder(mcfg: ModelConfig, folders: list[str]) -> ModelConfig:
    """The frozen-encoder weight paths the feature cache was made with, when the model names none.

    Features are the encoder's output, so a cache made with ``features.blip2_path=X`` (e.g. the tiny
    preset's trained encoder, ``cli.py tiny-encoder``) trains a model whose encoder is X: the run's
    model.yaml then names X, and captioning raw videos later runs that same encoder. Paths that differ
    between caches are left alone (the encoder checks refuse the mix)."""
    if mcfg.has_encoder_weights:
        return mcfg
    keys = list(mcfg.weight_paths())
    found = set()
    for folder in folders:
        written = read_shard_config(folder)
        features = written.features if written else {}
        if features.get("enabled"):
            found.add(tuple(features.get(k) for k in keys))
    if len(found) != 1 or not any(paths := found.pop()):
        return mcfg
    return dataclasses.replace(mcfg, **dict(zip(keys, paths, strict=True)))


def check_encoder_weights(folders: list[str], weights_hash: str) -> None:
    """Refuse features cached by an encoder with other weights than the model's (same config, other files)."""
    for folder in folders:
        identity = inspect_shards(folder).encoder
        theirs = identity.rpartition("-")[2] if identity and "-" in identity else None
        if theirs and theirs != weights_hash:
            raise ConfigError(
                f"the features in {str(folder)!r} were cached by an encoder with other weights (hash {theirs}, "
                f"this model's {weights_hash}): load the same encoder files, or rebuild the feature cache"
            )


# ---- streams ---------------------------------------------------------------------------------------


class DataError(ConfigError):
    """Too much of the training data is unusable to go on; a ConfigError so the CLI prints one line."""


def check_error_budget(errors: int, read: int, dataset_size: int, max_rate: float) -> None:
    """Stop when unusable samples exceed ``max_rate`` of what was read (at least of one pass over the
    data set): a corrupt shard or two in a large set only warns, a missing mount or a broken set stops."""
    if errors > max_rate * max(read, dataset_size):
        raise DataError(
            f"data: {errors} of {read} samples read so far were unusable, more than data.max_error_rate="
            f"{max_rate:g} of {max(read, dataset_size)}; the warnings above name the shards: fix or remove "
            "them, or raise data.max_error_rate"
        )


def epoch_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    return np.random.default_rng([seed, epoch]).permutation(num_shards).tolist()


def slot_samples(
    shards: list[tuple[str, int]], slot: int, num_slots: int, seed: int, skip: int = 0
) -> Iterator[dict[str, Any]]:
    """Endless samples of one dataset for one slot, after skipping ``skip``. Each carries the path of its
    shard (``shard``); a position that could not be read is ``{"shard", "unreadable": message}``."""
    if len(shards) < num_slots:
        raise ConfigError(
            f"{len(shards)} shards cannot feed {num_slots} streams (ranks x data.workers): "
            "use fewer data.workers or preprocess with a smaller --samples-per-shard"
        )
    if sum(n for _, n in shards) == 0:
        raise ConfigError("data: the shard set holds no samples")
    for epoch in itertools.count():
        for i in epoch_order(len(shards), seed, epoch)[slot::num_slots]:
            path, count = shards[i]
            if skip >= count:
                skip -= count
                continue
            yielded, message = 0, "fewer samples than its index lists"
            try:
                for sample in itertools.islice(read_shard(path), skip, count):
                    yielded += 1
                    yield {**sample, "shard": path}
            except Exception as e:  # a corrupt shard: its remaining positions count as errors
                text = str(e.args[0] if e.args else e).splitlines()  # tarfile packs (text, file, path)
                message = f"{type(e).__name__}: {text[0][:200] if text else ''}"
            for _ in range(count - skip - yielded):
                yield {"shard": path, "unreadable": message}
            skip = 0


def dataset_choice(weights: list[float], seed: int, slot: int, batch: int) -> int:
    if len(weights) == 1:
        return 0
    p = np.asarray(weights, dtype=np.float64) / sum(weights)
    return int(np.random.default_rng([seed, 1, slot, batch]).choice(len(p), p=p))


def _turns(conversations: Any) -> list[tuple[str, str]]:
    """``[{from: human|gpt, value}]`` -> (question, answer) pairs; a trailing question is dropped."""
    if not isinstance(conversations, list):
        return []
    values = [t.get("value") if isinstance(t, dict) else None for t in conversations]
    if not all(isinstance(v, str) for v in values):
        return []
    return list(zip(values[0::2], values[1::2], strict=False))


class TrainStream(IterableDataset):
    """Batches for one rank. ``cursors[w]`` is logical worker w's cursor; ``offset`` rotates worker ids."""

    def __init__(
        self,
        datasets: list[tuple[list[tuple[str, int]], float]],
        *,
        kind: str,
        tokenizer,
        mcfg: ModelConfig,
        micro_batch: int,
        max_caption_tokens: int,
        rank: int,
        world_size: int,
        workers: int,
        seed: int,
        cursors: list[dict[str, Any]] | None = None,
        offset: int = 0,
        task: str = "caption",
        template: str | None = None,
        max_len: int = 512,
        label_mask: str = "original",
        random_crop: bool = False,
    ):
        self.datasets, self.kind, self.tokenizer, self.mcfg = datasets, kind, tokenizer, mcfg
        self.micro_batch, self.max_caption_tokens = micro_batch, max_caption_tokens
        self.task, self.template, self.max_len, self.label_mask = task, template, max_len, label_mask
        self.random_crop = random_crop and kind == "frames"
        if task == "conversation" and template is None:
            raise ConfigError("data.template: conversation training needs 'vicuna' or 'llama2'")
        self.rank, self.world_size, self.workers = rank, world_size, max(workers, 1)
        self.seed, self.offset = seed, offset
        empty = {"batches": 0, "samples": [0] * len(datasets)}
        self.cursors = cursors or [dict(empty) for _ in range(self.workers)]

    def _view(self, x: np.ndarray, slot: int, batch: int, row: int) -> int | None:
        """Which of K preprocessed views (augmentation) to use, drawn from the seed: the same after a
        restart. None when the sample holds one view."""
        if x.ndim == SAMPLE_NDIM[self.kind]:
            return None
        return int(np.random.default_rng([self.seed, 2, slot, batch, row]).integers(len(x)))

    def _caption_text(self, sample: dict[str, Any], modality: str, slot: int, batch: int, row: int):
        """cc_sbu_align & co. in stage 2: the original's prompt_wrap form with a seeded instruction and
        the raw caption (the original's cc_sbu_align dataset did not clean it)."""
        raw = (sample.get("meta") or {}).get("caption_raw")
        caption = raw.strip() if isinstance(raw, str) and raw.strip() else sample.get("caption") or ""
        if not caption:
            return "error"
        pool = CAPTION_INSTRUCTIONS[modality]
        instruction = pool[int(np.random.default_rng([self.seed, 3, slot, batch, row]).integers(len(pool)))]
        prompt, end = instruction_prompt(self.template, modality, instruction)
        return caption_sample(
            self.tokenizer,
            caption,
            num_video_tokens=self.mcfg.num_video_query_tokens,
            max_caption_tokens=self.max_caption_tokens,
            end=end,
            prompt=prompt,
        )

    def _text(self, sample: dict[str, Any], x: np.ndarray, view: int | None, slot: int, batch: int, row: int):
        """ids + labels for one sample; "error" for an unusable sample, "too_long" for one that cannot fit."""
        n_video = self.mcfg.num_video_query_tokens
        if self.task == "caption":
            if not sample.get("caption"):
                return "error"
            return caption_sample(
                self.tokenizer,
                sample["caption"],
                num_video_tokens=n_video,
                max_caption_tokens=self.max_caption_tokens,
            )
        frames = x.shape[-SAMPLE_NDIM[self.kind]]  # T of [T,H,W,3] or [T,32,D]
        modality = "image" if frames == 1 else "video"
        meta = sample.get("meta") or {}
        if "conversations" not in meta:
            return self._caption_text(sample, modality, slot, batch, row)
        turns = _turns(meta["conversations"])
        message = ""
        if modality == "video":
            stamps = meta.get("timestamps")
            if view is not None and isinstance(stamps, list) and stamps and isinstance(stamps[0], list):
                stamps = stamps[view]
            if not isinstance(stamps, list) or len(stamps) != frames:
                return "error"
            message = frame_times_message(stamps)
        if not turns:
            return "error"
        text = conversation_sample(
            self.tokenizer,
            turns,
            self.template,
            modality,
            message,
            n_video,
            max_len=self.max_len,
            label_mask=self.label_mask,
        )
        return "too_long" if text is None else text

    def _prepare(self, sample: dict[str, Any], slot: int, batch: int, row: int):
        """(TextSample, array) for a usable sample, else the reason it is skipped."""
        x = sample.get(self.kind)
        if x is None or x.ndim - SAMPLE_NDIM[self.kind] not in (0, 1):
            return "error"
        view = self._view(x, slot, batch, row)
        x = x if view is None else x[view]
        if self.random_crop:  # drawn from the sample's place in the stream: the same after a restart
            x = random_resized_crop(
                x, np.random.default_rng([self.seed, 4, slot, batch, row]), self.mcfg.image_size
            )
        text = self._text(sample, x, view, slot, batch, row)
        return text if isinstance(text, str) else (text, x)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        logical = ((info.id if info else 0) + self.offset) % self.workers
        slot, num_slots = self.rank * self.workers + logical, self.world_size * self.workers
        cursor = self.cursors[logical]
        n, consumed = cursor["batches"], list(cursor["samples"])
        streams = [
            slot_samples(shards, slot, num_slots, self.seed + 7919 * d, skip=consumed[d])
            for d, (shards, _) in enumerate(self.datasets)
        ]
        sizes = [sum(c for _, c in shards) for shards, _ in self.datasets]
        weights = [w for _, w in self.datasets]
        pad = self.tokenizer.pad_token_id
        while True:
            d = dataset_choice(weights, self.seed, slot, n)
            texts: list[TextSample] = []
            arrays: list[np.ndarray] = []
            skipped = {"error": 0, "too_long": 0}
            bad_shards: dict[str, str] = {}  # shard -> why its sample was skipped as an error
            while len(texts) < self.micro_batch:
                sample = next(streams[d])
                got = self._prepare(sample, slot, n, len(texts))
                consumed[d] += 1
                if isinstance(got, str):
                    skipped[got] += 1
                    if got == "error":
                        bad_shards[sample["shard"]] = sample.get("unreadable", "unusable sample")
                    if sum(skipped.values()) > sizes[d]:
                        raise RuntimeError(
                            f"data.datasets[{d}]: no usable sample in a whole pass over its {sizes[d]} samples "
                            f"({skipped['too_long']} too long for data.max_len={self.max_len}); "
                            f"check data.task={self.task!r} against what the shards hold"
                        )
                    continue
                texts.append(got[0])
                arrays.append(got[1])
            batch = collate(texts, pad)
            batch[self.kind] = torch.from_numpy(np.stack(arrays))
            n += 1
            batch.update(
                slot=logical,
                dataset=d,
                errors=skipped["error"],
                bad_shards=bad_shards,
                too_long=skipped["too_long"],
                cursor={"batches": n, "samples": list(consumed)},
            )
            yield batch


def make_loader(stream: TrainStream, workers: int, prefetch: int) -> DataLoader:
    """Its own generator: creating the loader must not draw from the global RNG that dropout uses."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=prefetch if workers else None,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(stream.seed),
    )
