"""Weights in and out: frozen encoder from BLIP-2/LAVIS files, trainable weights to and from Video-LLaMA.

Every foreign layout is handled by a key-renaming function, never by a copied module:

* EVA ViT-g (``eva_vit_g.pth``)  -> ``Blip2VisionModel``: ``blocks.N.*`` -> ``encoder.layers.N.*``; the
  EVA attention has ``q_bias``/``v_bias`` and no k bias, transformers has one ``qkv.bias`` =
  cat(q_bias, 0, v_bias). Blocks past ``vision_layers`` (EVA-CLIP's 40th) are ignored.
* LAVIS BERT Q-Former (``Qformer.bert.*``, ``video_Qformer.bert.*``) -> ``Blip2QFormerModel``:
  ``embeddings.LayerNorm`` -> ``layernorm``, ``(cross)attention.self`` -> ``(cross)attention.attention``;
  the text-only parts (word/position embeddings, the text FFN ``intermediate``/``output``) are ignored.
* ``ln_vision`` -> ``visual_encoder.post_layernorm`` (see pipeline.model).

Our own export of the trainable weights is a directory with ``trainable.safetensors`` (our names, fp32)
and ``model.yaml`` (the ModelConfig needed to rebuild the model). Released Video-LLaMA checkpoints
(``{"model": state_dict, ...}``, LAVIS names) convert both ways, tensor for tensor.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config import load_config, save_yaml
from pipeline.model import ModelConfig, VideoLLaMA, vit_g
from pipeline.rundir import COMPLETE, MODEL_CONFIG, TRAINABLE_WEIGHTS

EXPORT_FORMAT = "videollama-pipeline/trainable-v1"
# Key of a ``.pth`` written by this project holding the ModelConfig (plain data, loads with
# weights_only): the shapes alone cannot tell a tiny model's heads or LLM apart from the original's.
PTH_MODEL_CONFIG = "videollama_pipeline_model_config"


class WeightsError(ValueError):
    """Weights that do not fit the model: the message names the keys and shapes."""


@dataclass
class LoadReport:
    """What a load did, by key name. ``ignored`` = known keys deliberately skipped (buffers, text-only
    Q-Former parts, the EVA block the model drops); ``unexpected`` = keys we do not recognise."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        for name in ("missing", "unexpected", "ignored"):
            keys = getattr(self, name)
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")
                lines.append(f"{name} ({len(keys)}): {shown}")
        return "\n".join(lines)


def torch_load(path: str | Path) -> dict:
    """``torch.load`` restricted to tensors and plain containers: a checkpoint cannot run code.

    A file that needs more (a pickled object, possibly hostile) or is not a torch file at all is one
    ``WeightsError`` line; torch's own message is not passed on, because it advises ``weights_only=False``,
    which would run whatever code the file carries.
    """
    try:
        with warnings.catch_warnings():  # torch's remarks on the pickle protocol of a file we may refuse
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise WeightsError(
            f"{path} is not loadable safely: it holds Python objects other than tensors and plain "
            "containers (refused: loading them could run code); it is not a Video-LLaMA/LAVIS checkpoint"
        ) from None
    except Exception as e:  # random bytes read as a legacy pickle fail many ways (IndexError, KeyError, ...)
        raise WeightsError(
            f"{path} is not a Video-LLaMA/LAVIS checkpoint: not a readable PyTorch file ({type(e).__name__})"
        ) from None


def _state_dict_of(ckpt: object, path: str | Path) -> dict[str, torch.Tensor]:
    """``{"model": state_dict, ...}`` (LAVIS / Video-LLaMA) or a bare state dict, else one clear error."""
    sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path} is not a Video-LLaMA/LAVIS checkpoint: it holds no state dict of tensors")
    return sd


# ---- key renaming ----------------------------------------------------------------------------------

_BERT_LAYER = re.compile(
    r"encoder\.layer\.(\d+)\.(attention|crossattention|intermediate_query|output_query)\.(.+)"
)


def lavis_bert_to_hf(key: str) -> str | None:
    """A key under LAVIS ``*.bert.`` -> the Blip2QFormerModel key, or None for the text-only parts."""
    if key.startswith("embeddings.LayerNorm."):
        return "layernorm." + key.removeprefix("embeddings.LayerNorm.")
    m = _BERT_LAYER.fullmatch(key)
    if not m:
        return None
    layer, part, rest = m.groups()
    if rest.startswith("self."):
        rest = "attention." + rest.removeprefix("self.")
    return f"encoder.layer.{layer}.{part}.{rest}"


def hf_to_lavis_bert(key: str) -> str:
    """Inverse of ``lavis_bert_to_hf``."""
    if key.startswith("layernorm."):
        return "embeddings.LayerNorm." + key.removeprefix("layernorm.")
    m = _BERT_LAYER.fullmatch(key)  # same part names on both sides; only "self" differs
    if not m:
        raise WeightsError(f"{key!r} is not a Blip2QFormerModel query-path key")
    layer, part, rest = m.groups()
    if rest.startswith("attention."):
        rest = "self." + rest.removeprefix("attention.")
    return f"encoder.layer.{layer}.{part}.{rest}"


_EVA_TOP = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
}
_EVA_BLOCK = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_EVA_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)")


def fuse_qv_bias(q_bias: torch.Tensor, v_bias: torch.Tensor) -> torch.Tensor:
    """EVA/old-BLIP-2 q and v biases -> one qkv bias with a zero k part (what EVA computes on the fly)."""
    return torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])


def eva_to_hf(sd: dict[str, torch.Tensor], num_layers: int) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Raw EVA ViT-g state dict -> Blip2VisionModel keys (no ``post_layernorm``: that is ``ln_vision``)."""
    out, report = {}, LoadReport()
    for key, value in sd.items():
        key = key.removeprefix("visual_encoder.")
        block = re.match(r"blocks\.(\d+)\.", key)
        if block and int(block.group(1)) >= num_layers:
            report.ignored.append(key)
        elif key in _EVA_TOP:
            out[_EVA_TOP[key]] = value
        elif key.endswith(("attn.q_bias", "attn.v_bias")):
            continue  # fused below
        elif (m := _EVA_BLOCK_KEY.fullmatch(key)) and m.group(2) in _EVA_BLOCK:
            out[f"encoder.layers.{m.group(1)}.{_EVA_BLOCK[m.group(2)]}.{m.group(3)}"] = value
        else:
            report.unexpected.append(key)
    for i in range(num_layers):
        q, v = sd.get(f"blocks.{i}.attn.q_bias"), sd.get(f"blocks.{i}.attn.v_bias")
        if q is not None and v is not None:
            out[f"encoder.layers.{i}.self_attn.qkv.bias"] = fuse_qv_bias(q, v)
    return out, report


def _hf_vision_legacy_biases(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Early transformers BLIP-2 files kept ``self_attn.q_bias``/``v_bias``; fuse them into ``qkv.bias``."""
    for q_key in [k for k in sd if k.endswith("self_attn.q_bias")]:
        prefix = q_key.removesuffix("q_bias")
        sd[prefix + "qkv.bias"] = fuse_qv_bias(sd.pop(q_key), sd.pop(prefix + "v_bias"))
    return sd


# ---- frozen encoder --------------------------------------------------------------------------------


def encoder_keys(model: VideoLLaMA) -> dict[str, torch.Size]:
    """Names and shapes of every frozen-encoder tensor the model needs."""
    parts = ("visual_encoder.", "qformer.", "query_tokens")
    return {k: v.shape for k, v in model.state_dict().items() if k.startswith(parts)}


def _read_hf_tensors(directory: Path, wanted) -> dict[str, torch.Tensor]:
    """Tensors whose key passes ``wanted`` from a (possibly sharded) HF directory, nothing else."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / index_name).is_file():
            files = sorted(set(json.loads((directory / index_name).read_text())["weight_map"].values()))
            break
    else:
        files = [n for n in ("model.safetensors", "pytorch_model.bin") if (directory / n).is_file()][:1]
    if not files:
        raise WeightsError(f"{directory} holds no model.safetensors or pytorch_model.bin")
    out = {}
    for name in files:
        if name.endswith(".safetensors"):
            with safe_open(str(directory / name), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys() if wanted(k)})  # noqa: SIM118
        else:
            out.update({k: v for k, v in torch_load(directory / name).items() if wanted(k)})
    return out


def hf_blip2_name(key: str) -> str:
    """Our frozen-encoder name -> the Hugging Face BLIP-2 name (``visual_encoder.`` is ``vision_model.``;
    ``qformer.*`` and ``query_tokens`` are the same): what ``hf_blip2_encoder`` maps back."""
    return "vision_model." + key.removeprefix("visual_encoder.") if key.startswith("visual_encoder.") else key


def hf_blip2_encoder(path: str | Path) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """ViT + ln_vision + Q-Former + query tokens from a Hugging Face BLIP-2 directory, in our names."""
    raw = _read_hf_tensors(Path(path), lambda k: k.startswith(("vision_model.", "qformer.", "query_tokens")))
    raw = _hf_vision_legacy_biases(raw)
    out, report = {}, LoadReport()
    for key, value in raw.items():
        if key.startswith("qformer.embeddings.") or key.endswith("position_ids"):
            report.ignored.append(key)  # text embeddings of the ITM variants
        elif key.startswith("vision_model."):
            out["visual_encoder." + key.removeprefix("vision_model.")] = value
        else:
            out[key] = value
    return out, report


def lavis_encoder(
    eva_path: str | Path, blip2_path: str | Path, num_layers: int
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """The original LAVIS files: ``eva_vit_g.pth`` (raw EVA) and ``blip2_pretrained_*.pth`` (``model``)."""
    vision, report = eva_to_hf(_state_dict_of(torch_load(eva_path), eva_path), num_layers)
    out = {"visual_encoder." + k: v for k, v in vision.items()}
    for key, value in _state_dict_of(torch_load(blip2_path), blip2_path).items():
        if key.startswith("ln_vision."):
            out["visual_encoder.post_layernorm." + key.removeprefix("ln_vision.")] = value
        elif key == "query_tokens":
            out[key] = value
        elif key.startswith("Qformer.bert.") and (hf := lavis_bert_to_hf(key.removeprefix("Qformer.bert."))):
            out["qformer." + hf] = value
        elif key.startswith(("Qformer.", "visual_encoder.")):
            report.ignored.append(key)  # text head/embeddings; the ViT comes from eva_vit_g.pth
        else:
            report.unexpected.append(key)
    return out, report


def check_shapes(sd: dict[str, torch.Tensor], expected: dict[str, torch.Size], what: str) -> None:
    """Raise one error naming every shape mismatch, with the LLM-size hint for ``llama_proj``."""
    bad = [k for k in sd if k in expected and tuple(sd[k].shape) != tuple(expected[k])]
    if not bad:
        return
    lines = [f"{k}: {what} has {list(sd[k].shape)}, the model expects {list(expected[k])}" for k in bad]
    if "llama_proj.weight" in bad:
        got, want = sd["llama_proj.weight"].shape[0], expected["llama_proj.weight"][0]
        names = {4096: "7B", 5120: "13B"}
        lines.append(
            f"{what} projects to an LLM of hidden size {got} ({names.get(got, '?')}) but the model's LLM "
            f"has {want} ({names.get(want, '?')}): set model.llm_hidden_size / llm_path to match"
        )
    raise WeightsError("shape mismatch:\n" + "\n".join(lines))


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], expected, what: str, report: LoadReport):
    check_shapes(sd, expected, what)
    report.unexpected += [k for k in sd if k not in expected]
    report.missing = [k for k in expected if k not in sd]
    if report.missing:
        raise WeightsError(f"{what} lacks {len(report.missing)} tensors the model needs:\n{report}")
    usable = {k: v for k, v in sd.items() if k in expected}
    current = model.state_dict()
    if any(current[k].is_meta for k in usable):  # built on the meta device: the files materialise it
        usable = {k: v.to(current[k].dtype) for k, v in usable.items()}
    model.load_state_dict(usable, strict=False, assign=any(current[k].is_meta for k in usable))
    report.loaded = sorted(usable)
    return report


def load_frozen_encoder(model: VideoLLaMA) -> LoadReport:
    """Load ViT, ln_vision, image Q-Former and query tokens from the paths in ``model.cfg``."""
    cfg = model.cfg
    if cfg.blip2_path:
        sd, report = hf_blip2_encoder(cfg.blip2_path)
        what = cfg.blip2_path
    elif cfg.eva_vit_path and cfg.qformer_lavis_path:
        sd, report = lavis_encoder(cfg.eva_vit_path, cfg.qformer_lavis_path, cfg.vision_layers)
        what = f"{cfg.eva_vit_path} + {cfg.qformer_lavis_path}"
    else:
        raise WeightsError(
            "model config names no encoder weights (blip2_path or eva_vit_path+qformer_lavis_path)"
        )
    return _load_into(model, sd, encoder_keys(model), what, report)


# ---- trainable weights: ours <-> released Video-LLaMA ---------------------------------------------


def trainable_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Names and shapes of the trainable tensors, from the model itself built on the meta device."""
    shapes_only = dataclasses.replace(cfg, llm_gradient_checkpointing=False)  # no LLM to configure
    with torch.device("meta"):
        model = VideoLLaMA(shapes_only, llm=nn.Identity())
    return {k: v.shape for k, v in model.trainable_state_dict().items()}


def _ignored_videollama_key(key: str) -> bool:
    return key.endswith(".position_ids") or (
        key.startswith("llama_model.") and key.endswith("rotary_emb.inv_freq")
    )


def videollama_to_ours(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """LAVIS names (``video_Qformer.bert.*`` ...) -> our names; unknown keys reported, not dropped silently."""
    out, report = {}, LoadReport()
    plain = ("video_query_tokens", "video_frame_position_embedding.", "llama_proj.")
    for key, value in sd.items():
        bert = key.startswith("video_Qformer.bert.") and lavis_bert_to_hf(
            key.removeprefix("video_Qformer.bert.")
        )
        if _ignored_videollama_key(key):
            report.ignored.append(key)
        elif bert:
            out["video_qformer." + bert] = value
        elif key.startswith(plain):
            out[key] = value
        else:
            report.unexpected.append(key)
    return out, report


def ours_to_videollama(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our trainable names -> the released checkpoints' LAVIS names."""
    out = {}
    for key, value in sd.items():
        if key.startswith("video_qformer."):
            key = "video_Qformer.bert." + hf_to_lavis_bert(key.removeprefix("video_qformer."))
        out[key] = value
    return out


def infer_config(sd: dict[str, torch.Tensor]) -> ModelConfig:
    """The ModelConfig of a trainable state dict (our names): the original sizes, with the LLM size,
    feature dim, query/frame counts, depth and FFN width read from the tensor shapes."""
    needed = ["llama_proj.weight", "video_query_tokens", "video_frame_position_embedding.weight"]
    needed.append("video_qformer.encoder.layer.0.intermediate_query.dense.weight")
    if absent := [k for k in needed if k not in sd]:
        raise WeightsError(f"cannot infer the model config: the checkpoint lacks {absent}")
    hidden = sd["llama_proj.weight"].shape[0]
    cfg = vit_g("13b") if hidden == 5120 else vit_g("7b")
    layers = {int(k.split(".")[3]) for k in sd if k.startswith("video_qformer.encoder.layer.")}
    return dataclasses.replace(
        cfg,
        llm_hidden_size=hidden,
        feature_dim=sd["video_query_tokens"].shape[2],
        num_video_query_tokens=sd["video_query_tokens"].shape[1],
        max_frames=sd["video_frame_position_embedding.weight"].shape[0],
        video_qformer_layers=max(layers) + 1,
        video_qformer_ffn=sd["video_qformer.encoder.layer.0.intermediate_query.dense.weight"].shape[0],
    )


def _carried_config(ckpt: object) -> ModelConfig | None:
    """The ModelConfig a ``.pth`` written by :func:`to_videollama_checkpoint` carries (released ones do not)."""
    values = ckpt.get(PTH_MODEL_CONFIG) if isinstance(ckpt, dict) else None
    return load_config(ModelConfig, values=values) if isinstance(values, dict) else None


def videollama_checkpoint_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a ``.pth``: the one it carries, else inferred from its tensor shapes."""
    ckpt = torch_load(path)
    return _carried_config(ckpt) or infer_config(videollama_to_ours(_state_dict_of(ckpt, path))[0])


def import_videollama_checkpoint(
    path: str | Path, cfg: ModelConfig | None = None
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """A released Video-LLaMA ``.pth`` -> (trainable state dict in our names, report).

    Checked against ``cfg`` (default: the config the file carries, else inferred from the shapes); a
    7B/13B mix-up raises WeightsError.
    """
    ckpt = torch_load(path)
    sd, report = videollama_to_ours(_state_dict_of(ckpt, path))
    expected = trainable_shapes(cfg or _carried_config(ckpt) or infer_config(sd))
    check_shapes(sd, expected, str(path))
    report.missing = [k for k in expected if k not in sd]
    report.unexpected += [k for k in sd if k not in expected]
    sd = {k: v for k, v in sd.items() if k in expected}
    report.loaded = sorted(sd)
    return sd, report


def to_videollama_checkpoint(
    sd: dict[str, torch.Tensor], path: str | Path, cfg: ModelConfig | None = None
) -> Path:
    """Write our trainable weights as a checkpoint the original code loads (``{"model": ...}``), with
    ``cfg`` as plain data under PTH_MODEL_CONFIG so converting it back needs no guess from shapes (the
    original ignores keys it does not know)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt: dict = {"model": ours_to_videollama({k: v.detach().cpu() for k, v in sd.items()})}
    if cfg is not None:
        ckpt[PTH_MODEL_CONFIG] = dataclasses.asdict(cfg)
    torch.save(ckpt, path)
    return path


def export_trainable(model_or_sd: VideoLLaMA | dict[str, torch.Tensor], cfg: ModelConfig, out_dir) -> Path:
    """Write ``trainable.safetensors`` + ``model.yaml``: what inference and the next stage load."""
    sd = model_or_sd.trainable_state_dict() if isinstance(model_or_sd, nn.Module) else dict(model_or_sd)
    expected = trainable_shapes(cfg)
    check_shapes(sd, expected, "export")
    if set(sd) != set(expected):
        raise WeightsError(
            f"export needs exactly the trainable tensors; missing {sorted(set(expected) - set(sd))}, "
            f"unexpected {sorted(set(sd) - set(expected))}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    save_file(tensors, str(out / TRAINABLE_WEIGHTS), metadata={"format": EXPORT_FORMAT})
    save_yaml(cfg, out / MODEL_CONFIG)
    return out


def sha256_file(path: str | Path) -> str:
    import hashlib

    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def verify_export(directory: str | Path) -> None:
    """Refuse an export whose files differ from the size and SHA-256 recorded when it was written.

    The record is the ``COMPLETE`` file next to it: a checkpoint's (``step_N/COMPLETE`` lists
    ``export/...``) or a finished run's (``RUN/COMPLETE`` for ``RUN/export``). An export without one
    (a ``convert`` output, a run from before the digests were recorded) has nothing to compare."""
    directory = Path(directory)
    record = directory.parent / COMPLETE
    if not record.is_file():
        return
    try:
        files = json.loads(record.read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        raise WeightsError(
            f"{record} is not valid JSON: the digests of {directory} cannot be checked"
        ) from None
    prefix = directory.name + "/"
    for rel, (size, digest) in files.items():
        if not rel.startswith(prefix):
            continue
        f = directory / rel.removeprefix(prefix)
        if not f.is_file():
            raise WeightsError(f"{f} is missing ({record} lists it)")
        if f.stat().st_size != size or sha256_file(f) != digest:
            raise WeightsError(
                f"{f} does not hold the bytes it was written with (its SHA-256 differs from the one "
                f"{record} recorded): refused; restore it or use another export"
            )


def nonfinite_tensors(sd: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def check_finite(sd: dict[str, torch.Tensor], where: str | Path) -> None:
    """Refuse weights of a diverged run: they caption nothing or fail inside sampling."""
    if bad := nonfinite_tensors(sd):
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise WeightsError(
            f"{where} holds non-finite weights (NaN or inf in {shown}): the run that wrote it diverged; "
            "use an earlier checkpoint's export"
        )


def load_trainable(directory: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """An export directory -> (trainable state dict, ModelConfig), shapes checked against the config;
    its files are checked against the digests recorded when it was written (:func:`verify_export`)."""
    directory = Path(directory)
    verify_export(directory)
    cfg = load_config(ModelConfig, directory / MODEL_CONFIG)
    path = directory / TRAINABLE_WEIGHTS
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError) as e:  # truncated, not safetensors, absent
        raise WeightsError(f"{path} is not a readable safetensors file ({e})") from None
    check_shapes(sd, trainable_shapes(cfg), str(directory))
    return sd, cfg


def load_trainable_weights(model: VideoLLaMA, src: str | Path) -> LoadReport:
    """Initialise the trainable parts from an export directory or a released Video-LLaMA ``.pth``."""
    if Path(src).is_dir():
        sd, _ = load_trainable(src)
        report = LoadReport()
    else:
        sd, report = import_videollama_checkpoint(src, model.cfg)
    check_finite(sd, src)
    return _load_into(model, sd, trainable_shapes(model.cfg), str(src), report)


# What a converted file may hold besides float32: other float types only on request (a deliberate cast).
CASTABLE = (torch.float16, torch.bfloat16, torch.float64)


def _names(keys: list[str], shown: int = 5) -> str:
    return ", ".join(keys[:shown]) + (f", ... ({len(keys) - shown} more)" if len(keys) > shown else "")


def _missing_error(what: str, keys: list[str]) -> WeightsError:
    return WeightsError(f"{what} lacks {len(keys)} trainable tensor(s): {_names(keys)}")


def _extra_error(what: str, keys: list[str]) -> WeightsError:
    return WeightsError(
        f"{what} holds {len(keys)} tensor(s) that are not trainable weights of this model: {_names(keys)}"
    )


def checked_trainable(
    sd: dict[str, torch.Tensor], expected: dict[str, torch.Size], what: str, cast_float32: bool = False
) -> dict[str, torch.Tensor]:
    """Exactly the trainable tensors, float32 and finite, or one WeightsError line saying what is not:
    a converted file is what a run starts from, so nothing in it may be dropped, guessed or NaN.
    ``cast_float32`` converts float16/bfloat16/float64 tensors; integer and bool tensors never are."""
    if missing := [k for k in expected if k not in sd]:
        raise _missing_error(what, missing)
    if extra := [k for k in sd if k not in expected]:
        raise _extra_error(what, extra)
    allowed = (torch.float32, *CASTABLE) if cast_float32 else (torch.float32,)
    if wrong := [
        f"{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in sd.items() if v.dtype not in allowed
    ]:
        hint = "" if cast_float32 else "; --cast-float32 converts float16/bfloat16/float64 deliberately"
        raise WeightsError(
            f"{what}: trainable weights are float32, {len(wrong)} tensor(s) are not: {_names(wrong)}{hint}"
        )
    sd = {k: v.float() for k, v in sd.items()}
    if nonfinite := [k for k, v in sd.items() if not torch.isfinite(v).all()]:
        raise WeightsError(f"{what}: {len(nonfinite)} tensor(s) hold NaN or inf: {_names(nonfinite)}")
    return sd


def convert(
    src: str | Path, dst: str | Path, cfg: ModelConfig | None = None, cast_float32: bool = False
) -> LoadReport:
    """``cli.py convert SRC DST``: a Video-LLaMA ``.pth`` -> export directory, or an export directory
    -> Video-LLaMA ``.pth``; the direction follows what SRC is. Refuses (``checked_trainable``) a
    missing or extra tensor, a dtype other than float32 unless ``cast_float32``, and NaN/inf."""
    src = Path(src)
    if src.is_dir():
        sd, export_cfg = load_trainable(src)
        sd = checked_trainable(sd, trainable_shapes(export_cfg), str(src), cast_float32)
        to_videollama_checkpoint(sd, dst, export_cfg)
        return LoadReport(loaded=sorted(sd))
    sd, report = import_videollama_checkpoint(src, cfg)
    if report.missing:
        raise _missing_error(str(src), report.missing)
    if report.unexpected:  # set aside by the import; a conversion keeps nothing back silently
        raise _extra_error(str(src), report.unexpected)
    model_cfg = cfg or videollama_checkpoint_config(src)
    sd = checked_trainable(sd, trainable_shapes(model_cfg), str(src), cast_float32)
    export_trainable(sd, model_cfg, dst)
    return report
