"""The training stream: one global sample order, sliced over ranks and loader workers.

The order is a pure function of the seed, the epoch, each dataset's shard list and sizes, and the mixture
weights (``GlobalOrder``, ``dataset_choice``), never of the ranks or the workers:

1. dataset ``d``'s positions 0, 1, 2, ... run over its epochs: epoch ``e`` takes its shards in
   ``epoch_order(seed + 7919 d, e)``, in blocks of ``data.shuffle_block`` shards whose samples are
   permuted together (``GlobalOrder``; read by random access, ``pipeline.shards.ShardFile``);
2. global step ``s`` draws one dataset with ``rng(seed, 1, s)`` (a batch never mixes datasets, which may
   differ in frames per clip; images are 1-frame clips) and takes its next ``global_batch = micro_batch x
   grad_accum x world`` positions;
3. that slice is cut into micro-batches of ``micro_batch``; rank ``r`` trains micro-batches ``r *
   grad_accum .. (r + 1) * grad_accum - 1``; its loader workers take turns (``TrainStream``).

The position a checkpoint stores is a few integers: the step and the positions consumed per dataset
(the epoch is ``consumed // size``). Any world size or worker count continues from it, and the global
batch of every later step holds the same samples.

Samples that cannot be used are counted and replaced by a spare drawn from the dataset by the seed and
the position (``GlobalOrder.spare``): ``errors`` (unreadable or incomplete samples) and ``too_long``
(conversations whose prompt cannot fit ``data.max_len`` without cutting the video block or every answer).
Every micro-batch still has ``micro_batch`` samples, so ranks never disagree about batches.

Augmentation (view of K, crop) and the instruction of a caption-only sample are drawn with
``rng(seed, tag, dataset, position[, try])``: keyed by the sample's visit, not by who reads it.

Text, by ``data.task`` (pipeline.prompts builds ids and labels):

* ``caption``: stage 1, ``[BOS] <ImageHere>*32 caption``;
* ``conversation``: stage 2 in ``data.template`` style. Samples with ``meta["conversations"]`` (LLaVA,
  VideoChat) use those turns, labelled by ``data.label_mask``; caption-only samples (cc_sbu_align) take
  the original's ``prompt_wrap`` form: a seeded instruction from ``CAPTION_INSTRUCTIONS`` and the raw
  caption, as MiniGPT-4 / Video-LLaMA trained them. 1-frame samples are images (``<Image>`` block);
  videos get the ``<Video>`` block and the frame-timestamp message from ``meta["timestamps"]``.
"""

from __future__ import annotations

import dataclasses
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
    ShardFile,
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


class GlobalOrder:
    """One dataset's global sample order: position ``p`` (0, 1, 2, ... over all epochs) -> (shard, index in
    the shard). Epoch ``e = p // size`` takes the shards in ``epoch_order(seed, e)``, cuts that list into
    blocks of ``block`` shards and permutes the samples of each block with ``rng(seed, e, block number)``:
    consecutive positions (one global batch) come from up to ``block`` shards, while a reader needs only
    one block's shards at a time. ``block=1``: each shard in file order. A pure function of the seed and the shard list with its counts: no
    rank, no worker."""

    def __init__(self, shards: list[tuple[str, int]], seed: int, block: int = 8):
        if sum(n for _, n in shards) == 0:
            raise ConfigError("data: the shard set holds no samples")
        self.shards, self.seed, self.block = shards, seed, max(block, 1)
        self.size = sum(n for _, n in shards)
        self._epoch: int | None = None
        self._blocks: list[list[int]] = []
        self._block_starts = np.zeros(1, dtype=np.int64)
        self._perm_key: tuple[int, int] | None = None
        self._perm = np.zeros(0, dtype=np.int64)
        self._flat = np.cumsum([0] + [n for _, n in shards])  # file-list order, for spare draws

    def locate(self, pos: int) -> tuple[int, int]:
        """(shard number in the list, sample index in that shard) of global position ``pos``."""
        epoch, offset = divmod(pos, self.size)
        if epoch != self._epoch:
            order = [i for i in epoch_order(len(self.shards), self.seed, epoch) if self.shards[i][1]]
            self._blocks = [order[k : k + self.block] for k in range(0, len(order), self.block)]
            sizes = [sum(self.shards[i][1] for i in blk) for blk in self._blocks]
            self._block_starts = np.cumsum([0, *sizes])
            self._epoch = epoch
        b = int(np.searchsorted(self._block_starts, offset, side="right")) - 1
        k = offset - int(self._block_starts[b])
        if self.block > 1:  # 1: each shard in file order
            if self._perm_key != (epoch, b):
                n = int(self._block_starts[b + 1] - self._block_starts[b])
                self._perm = np.random.default_rng([self.seed, 8, epoch, b]).permutation(n)
                self._perm_key = (epoch, b)
            k = int(self._perm[k])
        for i in self._blocks[b]:
            if k < self.shards[i][1]:
                return i, k
            k -= self.shards[i][1]
        raise AssertionError("unreachable: k < block size")

    def spare(self, pos: int, attempt: int) -> tuple[int, int]:
        """The sample that stands in for the unusable one at ``pos`` (its ``attempt``-th try): drawn from
        the whole dataset by the seed, the position and the try, so every topology draws the same."""
        n = int(np.random.default_rng([self.seed, 5, pos, attempt]).integers(self.size))
        i = int(np.searchsorted(self._flat, n, side="right")) - 1
        return i, n - int(self._flat[i])


class ShardReader:
    """Samples by (shard, index) for one loader worker, by random access (``ShardFile``), the last
    ``keep`` shards kept open. A sample that cannot be read is ``{"unreadable": message}``."""

    def __init__(self, shards: list[tuple[str, int]], keep: int = 16):
        self.shards, self.keep = shards, keep
        self.open: dict[str, ShardFile] = {}

    def get(self, i: int, index: int) -> dict[str, Any]:
        path, _ = self.shards[i]
        try:
            if path not in self.open:
                if len(self.open) >= self.keep:
                    self.open.pop(next(iter(self.open))).close()
                self.open[path] = ShardFile(path)
            self.open[path] = f = self.open.pop(path)  # most recently used last
            return {**f.sample(index), "shard": path}
        except Exception as e:  # a corrupt shard or sample: counted as an error
            text = str(e.args[0] if e.args else e).splitlines()  # tarfile packs (text, file, path)
            return {"shard": path, "unreadable": f"{type(e).__name__}: {text[0][:200] if text else ''}"}


def dataset_choice(weights: list[float], seed: int, step: int) -> int:
    """The dataset of global step ``step`` (a global batch comes from one dataset): the mixture state is
    the step number alone."""
    if len(weights) == 1:
        return 0
    p = np.asarray(weights, dtype=np.float64) / sum(weights)
    return int(np.random.default_rng([seed, 1, step]).choice(len(p), p=p))


def advance(consumed: list[int], weights: list[float], seed: int, step: int, global_batch: int) -> list[int]:
    """The global data position after step ``step``: its dataset consumed ``global_batch`` more positions."""
    after = list(consumed)
    after[dataset_choice(weights, seed, step)] += global_batch
    return after


def _turns(conversations: Any) -> list[tuple[str, str]]:
    """``[{from: human|gpt, value}]`` -> (question, answer) pairs; a trailing question is dropped."""
    if not isinstance(conversations, list):
        return []
    values = [t.get("value") if isinstance(t, dict) else None for t in conversations]
    if not all(isinstance(v, str) for v in values):
        return []
    return list(zip(values[0::2], values[1::2], strict=False))


class TrainStream(IterableDataset):
    """This rank's micro-batches from step ``start_step`` on, the datasets' global positions at ``consumed``.

    Global step ``s`` takes ``global_batch = micro_batch x grad_accum x world_size`` consecutive positions
    of one dataset's :class:`GlobalOrder` (``dataset_choice``). Its micro-batch ``j`` is the positions
    ``[j * micro_batch, (j + 1) * micro_batch)`` of that slice; rank ``r`` computes ``j = r * grad_accum
    + a`` for its ``a``-th micro-batch of the step; DataLoader worker ``w`` of ``W`` makes the rank's
    micro-batches ``k`` with ``k % W == w`` (the loader hands them out in that order)."""

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
        seed: int,
        grad_accum: int = 1,
        shuffle_block: int = 8,
        start_step: int = 0,
        consumed: list[int] | None = None,
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
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.seed, self.start_step, self.shuffle_block = seed, start_step, shuffle_block
        self.consumed = list(consumed) if consumed is not None else [0] * len(datasets)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def _view(self, x: np.ndarray, visit: tuple[int, ...]) -> int | None:
        """Which of K preprocessed views (augmentation) to use, drawn from the seed: the same after a
        restart. None when the sample holds one view."""
        if x.ndim == SAMPLE_NDIM[self.kind]:
            return None
        return int(np.random.default_rng([self.seed, 2, *visit]).integers(len(x)))

    def _caption_text(self, sample: dict[str, Any], modality: str, visit: tuple[int, ...]):
        """cc_sbu_align & co. in stage 2: the original's prompt_wrap form with a seeded instruction and
        the raw caption (the original's cc_sbu_align dataset did not clean it)."""
        raw = (sample.get("meta") or {}).get("caption_raw")
        caption = raw.strip() if isinstance(raw, str) and raw.strip() else sample.get("caption") or ""
        if not caption:
            return "error"
        pool = CAPTION_INSTRUCTIONS[modality]
        instruction = pool[int(np.random.default_rng([self.seed, 3, *visit]).integers(len(pool)))]
        prompt, end = instruction_prompt(self.template, modality, instruction)
        return caption_sample(
            self.tokenizer,
            caption,
            num_video_tokens=self.mcfg.num_video_query_tokens,
            max_caption_tokens=self.max_caption_tokens,
            end=end,
            prompt=prompt,
        )

    def _text(self, sample: dict[str, Any], x: np.ndarray, view: int | None, visit: tuple[int, ...]):
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
            return self._caption_text(sample, modality, visit)
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

    def _prepare(self, sample: dict[str, Any], visit: tuple[int, ...]):
        """(TextSample, array) for a usable sample, else the reason it is skipped."""
        x = sample.get(self.kind)
        if x is None or x.ndim - SAMPLE_NDIM[self.kind] not in (0, 1):
            return "error"
        view = self._view(x, visit)
        x = x if view is None else x[view]
        if self.random_crop:  # drawn from the sample's place in the stream: the same after a restart
            x = random_resized_crop(x, np.random.default_rng([self.seed, 4, *visit]), self.mcfg.image_size)
        text = self._text(sample, x, view, visit)
        return text if isinstance(text, str) else (text, x)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        orders = [
            GlobalOrder(shards, self.seed + 7919 * d, self.shuffle_block)
            for d, (shards, _) in enumerate(self.datasets)
        ]
        readers = [ShardReader(shards) for shards, _ in self.datasets]
        weights = [w for _, w in self.datasets]
        consumed, step, k = list(self.consumed), self.start_step, 0
        while True:
            d = dataset_choice(weights, self.seed, step)
            for a in range(self.grad_accum):
                if k % workers == worker:
                    j = self.rank * self.grad_accum + a
                    start = consumed[d] + j * self.micro_batch
                    yield self._micro_batch(orders[d], readers[d], d, start, step, j)
                k += 1
            consumed = advance(consumed, weights, self.seed, step, self.global_batch)
            step += 1

    def _micro_batch(self, order: GlobalOrder, reader: ShardReader, d: int, start: int, step: int, j: int):
        """Positions ``start .. start + micro_batch - 1`` of dataset ``d``. An unusable sample (unreadable,
        or a conversation too long for ``data.max_len``) is counted and replaced by a spare drawn by
        ``GlobalOrder.spare``, so every micro-batch holds ``micro_batch`` samples on every topology.
        Augmentation keys on the visit ``(dataset, position[, try])``: the same whoever reads it."""
        texts: list[TextSample] = []
        arrays: list[np.ndarray] = []
        keys: list[str] = []
        skipped = {"error": 0, "too_long": 0}
        bad_shards: dict[str, str] = {}  # shard -> why its sample was skipped as an error
        for pos in range(start, start + self.micro_batch):
            where, visit, attempt = order.locate(pos), (d, pos), 0
            while True:
                sample = reader.get(*where)
                got = self._prepare(sample, visit)
                if not isinstance(got, str):
                    break
                skipped[got] += 1
                if got == "error":
                    bad_shards[sample["shard"]] = sample.get("unreadable", "unusable sample")
                attempt += 1
                if attempt > order.size:
                    raise RuntimeError(
                        f"data.datasets[{d}]: no usable sample in {order.size} draws over its {order.size} "
                        f"samples ({skipped['too_long']} too long for data.max_len={self.max_len}); "
                        f"check data.task={self.task!r} against what the shards hold"
                    )
                where, visit = order.spare(pos, attempt), (d, pos, attempt)
            texts.append(got[0])
            arrays.append(got[1])
            keys.append(f"{d}/{Path(sample['shard']).name}/{sample.get('key')}")
        batch = collate(texts, self.tokenizer.pad_token_id)
        batch[self.kind] = torch.from_numpy(np.stack(arrays))
        batch.update(
            step=step,
            micro=j,
            dataset=d,
            keys=keys,
            errors=skipped["error"],
            bad_shards=bad_shards,
            too_long=skipped["too_long"],
        )
        return batch


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
