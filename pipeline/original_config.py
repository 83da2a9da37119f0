"""The original Video-LLaMA's YAML configs -> this project's config keys (``cli.py import-config``).

    python cli.py import-config train_configs/visionbranch_stage1_pretrain.yaml > configs/my_stage1.yaml
    torchrun --nproc_per_node=8 cli.py train --config configs/my_stage1.yaml      # was: torchrun
        --nproc_per_node=8 train.py --cfg-path train_configs/visionbranch_stage1_pretrain.yaml
    python cli.py import-config eval_configs/video_llama_eval_only_vl.yaml > serve.yaml
    python cli.py serve --config serve.yaml                                        # was: python demo.py

A ``train_configs/*.yaml`` becomes a TrainConfig (train/config.py), an ``eval_configs/*.yaml`` a
ServeConfig (infer/serve.py); both as plain dicts here, validated by the CLI. Every key that does not
carry over is returned as a note saying why (the audio branch, ``amp`` becoming bf16, ...).

The shipped files do not all parse as YAML: the LLaMA-2-era ones offer alternatives as
``llama_model: "ckpt/vicuna-13b/" or "ckpt/vicuna-7b/"`` (the first is taken, with a note), and
``visionbranch_stage2_finetune.yaml`` indents ``cc_sbu_align``'s keys under a scalar (re-indented, with a
note). Dataset paths become shard folders (``data/<name>/shards``) with the ``cli.py preprocess`` command
that makes each from the original's annotation and media paths.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The project's weight paths for what the original downloads from LAVIS URLs (configs/stage1_vit-g_7b.yaml)
ENCODER_PATHS = {
    "eva_vit_path": "models/eva_vit_g.pth",
    "qformer_lavis_path": "models/blip2_pretrained_flant5xxl.pth",
}
# original dataset name -> (preprocess --dataset, media flag, clips of one frame)
DATASETS = {
    "webvid": ("webvid", "--videos", False),
    "cc_sbu_align": ("cc_sbu_align", "--images", True),
    "llava_instruct": ("llava", "--images", True),
    "webvid_instruct": ("videochat", "--videos", False),
}
INSTRUCTION_SETS = ("llava_instruct", "webvid_instruct")
# keys that say nothing this project needs, and why
IGNORED = {
    "model.arch": "one architecture here (pipeline.model.VideoLLaMA)",
    "model.model_type": "the LLM's sizes come from model_preset and llm_path",
    "model.fusion_head_layers": "not used by the original's vision branch (its video Q-Former has 2 layers, "
    "the project's model.video_qformer_layers)",
    "model.fusion_header_type": "not used by the original's vision branch",
    "model.prompt_path": "the original's instruction lists are built in (train/data.py)",
    "model.prompt": "the stage-1 prompt is built in (pipeline.generate)",
    "run.task": "one task in the original; data.task (caption/conversation) follows from the datasets",
    "run.train_splits": "shard folders hold one split each",
    "run.device": "the launcher decides (cuda when available)",
    "run.world_size": "torchrun/deepspeed set the world size (--nproc_per_node, Slurm)",
    "run.dist_url": "torchrun/deepspeed set the rendezvous",
    "run.distributed": "distributed whenever launched with more than one process",
    "run.resume_ckpt_path": "a rerun with the same run_dir resumes from its newest checkpoint",
}
AUDIO = "the audio branch (ImageBind + audio Q-Former) is not built here: vision branch only"
ALTERNATIVES = re.compile(
    r"""^(\s*[\w.]+:\s*)((?:"[^"]*"|'[^']*')(?:\s+or\s+(?:"[^"]*"|'[^']*'))+)\s*(#.*)?$"""
)


@dataclass
class Imported:
    kind: str  # "train" or "eval"
    values: dict[str, Any]  # TrainConfig or ServeConfig keys
    notes: list[str] = field(default_factory=list)  # "key: why it is not carried over" / what was repaired
    commands: list[str] = field(default_factory=list)  # preprocess commands that make the shard folders


def _repair(text: str, notes: list[str]) -> str:
    """Take the first of ``"a" or "b"`` alternatives; re-indent keys indented under a scalar value."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = ALTERNATIVES.match(line)
        if m:
            options = [o[1:-1] for o in re.findall(r""""[^"]*"|'[^']*'""", m.group(2))]
            lines[i] = f'{m.group(1)}"{options[0]}"'
            notes.append(
                f"{m.group(1).strip()} offers {' or '.join(options)}: took {options[0]!r} (line {i + 1})"
            )
    out: list[str] = []
    prev: tuple[int, bool] | None = None  # the last line's indentation, and whether it holds a value
    shift, block = 0, None  # a mis-indented block: its indentation and the spaces it loses
    for i, line in enumerate(lines):
        body = line.split("#", 1)[0].rstrip()
        if not body.strip():
            out.append(line)
            continue
        indent = len(line) - len(line.lstrip())
        if block is not None and indent < block:
            shift, block = 0, None
        if block is None and prev and prev[1] and indent > prev[0]:
            shift, block = indent - prev[0], indent
            notes.append(f"line {i + 1} is indented under a value: read at the indentation of the line above")
        line = line[shift:]
        out.append(line)
        text = body.strip()
        prev = (
            indent - shift,
            ":" in text and not text.endswith((":", "|", ">")) and not text.startswith("-"),
        )
    return "\n".join(out) + "\n"


def read_original(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """The original config as a dict, after the repairs its shipped files need; notes name each repair."""
    notes: list[str] = []
    text = _repair(Path(path).read_text(), notes)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not YAML even after repairs: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or "model" not in data:
        raise ValueError(f"{path}: not a Video-LLaMA config (no model: section)")
    return data, notes


def _int(value: Any, key: str, notes: list[str]) -> int:
    if isinstance(value, int):
        return value
    digits = re.match(r"\s*(\d+)", str(value))
    if not digits:
        raise ValueError(f"{key}: {value!r} is not a number")
    notes.append(f"{key}: {value!r} is not a number in the original either: read as {digits[1]}")
    return int(digits[1])


def _template(model: dict, notes: list[str]) -> str:
    """The conversation style: the model section's end_sym / prompt_template, else the LLM's name."""
    if model.get("end_sym") == "</s>" or "[INST]" in str(model.get("prompt_template", "")):
        return "llama2"
    if model.get("end_sym") == "###" or "###" in str(model.get("prompt_template", "")):
        return "vicuna"
    llm = str(model.get("llama_model", "")).lower()
    return "llama2" if "llama-2" in llm and "chat" in llm else "vicuna"


def _model(model: dict, notes: list[str], used: set[str]) -> dict[str, Any]:
    """Keys shared by train and eval configs: the LLM, the encoder files, the video Q-Former sizes."""
    out: dict[str, Any] = {}
    if llm := model.get("llama_model"):
        out["llm_path"] = str(llm).rstrip("/")
    out.update(ENCODER_PATHS)
    notes.append(
        "the frozen ViT and Q-Former: the original downloads eva_vit_g.pth and blip2_pretrained_flant5xxl.pth "
        f"from LAVIS URLs; give local copies at {ENCODER_PATHS['eva_vit_path']} and "
        f"{ENCODER_PATHS['qformer_lavis_path']} (or model.blip2_path=DIR)"
    )
    if "num_video_query_token" in model:
        out["num_video_query_tokens"] = _int(
            model["num_video_query_token"], "model.num_video_query_token", notes
        )
    if "max_frame_pos" in model:
        out["max_frames"] = _int(model["max_frame_pos"], "model.max_frame_pos", notes)
    if model.get("num_query_token", 32) != 32:
        notes.append(
            f"model.num_query_token: {model['num_query_token']} differs from BLIP-2's 32 (kept at 32)"
        )
    if model.get("image_size", 224) != 224:
        notes.append(f"model.image_size: {model['image_size']}: the vit-g presets take 224 px")
    used.update(
        (
            "llama_model",
            "num_video_query_token",
            "max_frame_pos",
            "num_query_token",
            "image_size",
            "vit_precision",
        )
    )
    for key in ("freeze_vit", "freeze_qformer"):
        used.add(key)
        if model.get(key) is False:
            notes.append(
                f"model.{key}: False: the frozen encoder stays frozen here (it is cached as features)"
            )
    for key in ("frozen_llama_proj", "frozen_video_Qformer"):
        used.add(key)
        if model.get(key) is True:
            notes.append(f"model.{key}: True: the video Q-Former and llama_proj always train here")
    for key in ("equip_audio_branch", "imagebind_ckpt_path", "frozen_audio_Qformer", "ckpt_2"):
        if key in model:
            used.add(key)
            if model[key] not in (False, None) or key != "equip_audio_branch":
                notes.append(f"model.{key}: {AUDIO}")
    if "low_resource" in model:
        used.add("low_resource")
        if model["low_resource"]:
            notes.append("model.low_resource: 8-bit LLM loading is not supported (model.llm_dtype=bfloat16)")
    return out


def _datasets(datasets: dict, notes: list[str], commands: list[str]) -> list[dict[str, Any]]:
    specs = []
    for name, d in datasets.items():
        d = d or {}
        if name not in DATASETS:
            notes.append(f"datasets.{name}: no preprocessing for this dataset here (webvid, cc_sbu_align, "
                         "llava_instruct, webvid_instruct)")  # fmt: skip
            continue
        kind, media_flag, image = DATASETS[name]
        info = d.get("build_info") or {}
        frames = (
            1
            if image
            else _int(((d.get("vis_processor") or {}).get("train") or {}).get("n_frms", 8), "n_frms", notes)
        )
        shards = f"data/{name}/shards"
        if "storage" in info:  # cc_sbu_align: filter_cap.json + image/
            anno, media = (
                f"{info['storage'].rstrip('/')}/filter_cap.json",
                f"{info['storage'].rstrip('/')}/image",
            )
        else:
            anno, media = info.get("anno_dir", "ANNOTATIONS"), info.get("videos_dir", "MEDIA")
        sampling = " --sampling headtail" if not image and _train_proc(d) == "alpro_video_train" else ""
        frames_flag = "" if image else f" --num-frames {frames}"
        commands.append(
            f"python cli.py preprocess --dataset {kind} --annotations {anno} {media_flag} {media} "
            f"--output {shards}{sampling}{frames_flag}"
        )
        specs.append({"shards": shards, "weight": d.get("sample_ratio", 1), "num_frames": frames})
        for key in d:
            if key in ("tokenizer_name", "num_video_query_token"):
                notes.append(
                    f"datasets.{name}.{key}: taken from the model (llm_path, num_video_query_tokens)"
                )
            elif key not in (
                "data_type",
                "build_info",
                "vis_processor",
                "text_processor",
                "sample_ratio",
                "model_type",
            ):
                notes.append(f"datasets.{name}.{key}: not a key this project knows")
    return specs


def _train_proc(d: dict) -> str:
    return str(((d.get("vis_processor") or {}).get("train") or {}).get("name", ""))


def _run(run: dict, notes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"optim": {}}
    sched = run.get("lr_sched", "linear_warmup_cosine_lr")
    if sched != "linear_warmup_cosine_lr":
        notes.append(f"run.lr_sched: {sched!r}: the schedule here is linear_warmup_cosine_lr")
    for key in ("init_lr", "min_lr", "warmup_lr", "weight_decay"):
        if key in run:
            out["optim"][key] = float(run[key])
    if "warmup_steps" in run:
        out["optim"]["warmup_steps"] = int(run["warmup_steps"])
    simple = {"max_epoch": "epochs", "iters_per_epoch": "steps_per_epoch", "batch_size_train": "micro_batch",
              "seed": "seed", "output_dir": "run_dir"}  # fmt: skip
    for key, ours in simple.items():
        if key in run:
            out[ours] = run[key]
    if "num_workers" in run:
        out["data"] = {"workers": int(run["num_workers"])}
    if "batch_size_eval" in run:
        out["eval"] = {"batch_size": int(run["batch_size_eval"])}
    if run.get("amp"):
        out["precision"] = "auto"
        notes.append("run.amp: True: fp16 autocast + loss scaling becomes bf16 on GPU (precision: auto)")
    if run.get("evaluate"):
        notes.append("run.evaluate: True: validation during training is eval.shards=DIR (held-out shards)")
    for key, why in IGNORED.items():
        section, name = key.split(".")
        if section == "run" and name in run and not (name == "resume_ckpt_path" and run[name] is None):
            notes.append(f"{key}: {why}")
    known = {"lr_sched", "init_lr", "min_lr", "warmup_lr", "weight_decay", "warmup_steps", "num_workers",
             "batch_size_eval", "amp", "evaluate", *simple, *(k.split(".")[1] for k in IGNORED if k.startswith("run."))}  # fmt: skip
    notes += [f"run.{k}: not a key this project knows" for k in run if k not in known]
    return out


def _model_leftovers(model: dict, used: set[str], notes: list[str]) -> None:
    for key in model:
        if f"model.{key}" in IGNORED:
            notes.append(f"model.{key}: {IGNORED[f'model.{key}']}")
        elif key not in used:
            notes.append(f"model.{key}: not a key this project knows")


def import_config(path: str | Path) -> Imported:
    """An original train_configs/*.yaml or eval_configs/*.yaml -> this project's config values + notes."""
    data, notes = read_original(path)
    model, datasets, run = data.get("model") or {}, data.get("datasets") or {}, data.get("run") or {}
    used = {"end_sym", "prompt_template", "max_txt_len", "ckpt", "llama_proj_model"}
    mcfg = _model(model, notes, used)
    template = _template(model, notes)
    for name, d in datasets.items():
        kind = (d or {}).get("model_type") if isinstance(d, dict) else None
        if kind and {"llama_v2": "llama2"}.get(kind, kind) != template:
            notes.append(
                f"datasets.{name}.model_type: {kind!r} disagrees with the model's template; took {template}"
            )
    if "lr_sched" not in run and "init_lr" not in run:  # an eval config: the demo's settings
        sizes = {k: mcfg.pop(k) for k in ("num_video_query_tokens", "max_frames") if k in mcfg}
        source = {"checkpoint": str(model.get("ckpt", "")), **mcfg, **({"config": sizes} if sizes else {})}
        values = {"model": source, "generation": {"template": template}}
        frames = [
            ((d or {}).get("vis_processor") or {}).get("train", {}).get("n_frms") for d in datasets.values()
        ]
        if frames and frames[0]:
            values["num_frames"] = _int(frames[0], "n_frms", notes)
        if "max_txt_len" in model:
            notes.append("model.max_txt_len: a training limit; generation stops at generation.max_new_tokens")
        _model_leftovers(model, used, notes)
        return Imported("eval", values, notes)
    commands: list[str] = []
    specs = _datasets(datasets, notes, commands)
    conversation = any(name in INSTRUCTION_SETS for name in datasets)
    preset = "vit-g-13b" if "13b" in str(model.get("llama_model", "")).lower() else "vit-g-7b"
    values: dict[str, Any] = {"run_dir": "runs/imported", "model_preset": preset, "model": mcfg}
    data_cfg: dict[str, Any] = {"datasets": specs, "task": "conversation" if conversation else "caption"}
    if conversation:
        data_cfg["template"] = template
    video_frames = [s["num_frames"] for s in specs if s["num_frames"] > 1]
    data_cfg["num_frames"] = max(video_frames, default=8)
    if "max_txt_len" in model:
        data_cfg["max_caption_tokens"] = int(model["max_txt_len"])
    if ckpt := model.get("ckpt"):
        values["init_from"] = str(ckpt)
    if model.get("llama_proj_model"):
        notes.append(
            f"model.llama_proj_model: {model['llama_proj_model']!r} (MiniGPT-4's llama_proj) is not loaded: "
            "llama_proj starts from random init here (init_from takes a Video-LLaMA checkpoint or an export)"
        )
    r = _run(run, notes)
    data_cfg.update(r.pop("data", {}))
    values.update(r)
    values["data"] = data_cfg
    values["experiment"] = Path(str(values["run_dir"])).name
    _model_leftovers(model, used, notes)
    return Imported("train", values, notes, commands)


def render(imported: Imported, source: str) -> str:
    """The YAML text to print: how to run it, the shard commands, then the values."""
    if imported.kind == "train":
        head = [
            f"# Imported from the original's {source} (python cli.py import-config).",
            "# Run (the original: torchrun --nproc_per_node=N train.py --cfg-path ...):",
            "#   torchrun --nproc_per_node=N cli.py train --config THIS_FILE",
            "#   check first: python cli.py train --config THIS_FILE --dry-run",
            "# Make the shard folders first:",
            *(f"#   {c}" for c in imported.commands),
        ]
    else:
        head = [
            f"# Imported from the original's {source} (python cli.py import-config).",
            "# Run (the original: python demo.py --cfg-path ... --gpu-id 0):",
            "#   python cli.py serve --config THIS_FILE",
        ]
    body = yaml.safe_dump(imported.values, sort_keys=False, default_flow_style=False)
    return "\n".join(head) + "\n" + body
