"""Weights in and out, with state dicts written here in the original key names and shapes."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pipeline.model import VideoLLaMA, tiny, vit_g
from pipeline.weights import (
    LoadReport,
    WeightsError,
    convert,
    export_trainable,
    import_videollama_checkpoint,
    load_frozen_encoder,
    load_trainable,
    load_trainable_weights,
    to_videollama_checkpoint,
    torch_load,
)


def _bert_layer_shapes(prefix, i, d, ffn, enc, cross=True, text_ffn=False):
    """LAVIS BERT layer keys (``{prefix}.encoder.layer.{i}.*``) and shapes, as listed in REFERENCE.md."""
    shapes = {}
    for block, kv_in in [("attention", d)] + ([("crossattention", enc)] if cross else []):
        for name, fan_in in (("query", d), ("key", kv_in), ("value", kv_in)):
            shapes[f"{block}.self.{name}.weight"] = (d, fan_in)
            shapes[f"{block}.self.{name}.bias"] = (d,)
        shapes |= {f"{block}.output.dense.weight": (d, d), f"{block}.output.dense.bias": (d,)}
        shapes |= {f"{block}.output.LayerNorm.weight": (d,), f"{block}.output.LayerNorm.bias": (d,)}
    for ffn_name in ("intermediate_query", "output_query") + (("intermediate", "output") if text_ffn else ()):
        if ffn_name.startswith("intermediate"):
            shapes |= {f"{ffn_name}.dense.weight": (ffn, d), f"{ffn_name}.dense.bias": (ffn,)}
        else:
            shapes |= {f"{ffn_name}.dense.weight": (d, ffn), f"{ffn_name}.dense.bias": (d,)}
            shapes |= {f"{ffn_name}.LayerNorm.weight": (d,), f"{ffn_name}.LayerNorm.bias": (d,)}
    return {f"{prefix}.encoder.layer.{i}.{k}": v for k, v in shapes.items()}


def videollama_shapes(hidden=4096, d=768, ffn=3072):
    shapes = {
        "video_query_tokens": (1, 32, d),
        "video_frame_position_embedding.weight": (32, d),
        "video_Qformer.bert.embeddings.LayerNorm.weight": (d,),
        "video_Qformer.bert.embeddings.LayerNorm.bias": (d,),
        "llama_proj.weight": (hidden, d),
        "llama_proj.bias": (hidden,),
    }
    for i in (0, 1):
        shapes |= _bert_layer_shapes("video_Qformer.bert", i, d, ffn, enc=d)
    return shapes


def random_state(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


@pytest.fixture(scope="module")
def released_7b(tmp_path_factory):
    """A checkpoint laid out like a released Video-LLaMA one, 7B sizes, plus the keys to ignore."""
    sd = random_state(videollama_shapes())
    extras = {
        "video_Qformer.bert.embeddings.position_ids": torch.arange(512)[None],
        "llama_model.model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(64),
    }
    path = tmp_path_factory.mktemp("released") / "finetune-vicuna7b-v2.pth"
    torch.save({"model": sd | extras, "optimizer": {"state": {}}, "config": {"run": {}}, "epoch": 2}, path)
    return path, sd


def test_released_checkpoint_round_trips_exactly(released_7b, tmp_path):
    path, original = released_7b
    assert sum(v.numel() for v in original.values()) == 22_104_064
    sd, report = import_videollama_checkpoint(path, vit_g("7b"))
    assert report.missing == [] and report.unexpected == []
    assert sorted(report.ignored) == sorted(
        [
            "video_Qformer.bert.embeddings.position_ids",
            "llama_model.model.layers.0.self_attn.rotary_emb.inv_freq",
        ]
    )
    assert len(sd) == len(original) == len(report.loaded)
    # a few names spelled out: the LAVIS -> transformers renaming
    assert torch.equal(
        sd["video_qformer.encoder.layer.1.crossattention.attention.key.weight"],
        original["video_Qformer.bert.encoder.layer.1.crossattention.self.key.weight"],
    )
    assert torch.equal(
        sd["video_qformer.layernorm.bias"], original["video_Qformer.bert.embeddings.LayerNorm.bias"]
    )

    export_trainable(sd, vit_g("7b"), tmp_path / "export")
    loaded, cfg = load_trainable(tmp_path / "export")
    assert cfg == vit_g("7b")
    back = torch_load(to_videollama_checkpoint(loaded, tmp_path / "back.pth"))["model"]
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) and back[k].dtype == torch.float32 for k in original)


def test_convert_both_directions(released_7b, tmp_path):
    path, original = released_7b
    report = convert(path, tmp_path / "export")  # config inferred from the shapes
    assert report.missing == [] and report.unexpected == []
    _, cfg = load_trainable(tmp_path / "export")
    assert (cfg.llm_hidden_size, cfg.feature_dim, cfg.video_qformer_layers) == (4096, 768, 2)
    convert(tmp_path / "export", tmp_path / "again.pth")
    again = torch_load(tmp_path / "again.pth")["model"]
    assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in original)


def test_13b_checkpoint_into_7b_model_is_a_clear_error(tmp_path):
    path = tmp_path / "13b.pth"
    torch.save({"model": random_state(videollama_shapes(hidden=5120))}, path)
    with pytest.raises(
        WeightsError, match=r"llama_proj.weight: .* \[5120, 768\], the model expects \[4096, 768\]"
    ) as e:
        import_videollama_checkpoint(path, vit_g("7b"))
    assert "13B" in str(e.value) and "7B" in str(e.value)
    sd, report = import_videollama_checkpoint(path, vit_g("13b"))
    assert report.missing == [] and sd["llama_proj.weight"].shape == (5120, 768)
    _, inferred = import_videollama_checkpoint(path)
    assert inferred.missing == []


def test_missing_and_unexpected_keys_are_named(tmp_path):
    sd = random_state(videollama_shapes())
    del sd["llama_proj.bias"]
    sd["audio_Qformer.bert.embeddings.LayerNorm.weight"] = torch.ones(768)  # the audio branch
    path = tmp_path / "partial.pth"
    torch.save({"model": sd}, path)
    _, report = import_videollama_checkpoint(path, vit_g("7b"))
    assert report.missing == ["llama_proj.bias"]
    assert report.unexpected == ["audio_Qformer.bert.embeddings.LayerNorm.weight"]
    assert "missing (1): llama_proj.bias" in str(report)
    with pytest.raises(WeightsError, match="llama_proj.bias"):
        convert(path, tmp_path / "out")
    with pytest.raises(WeightsError, match="missing"):
        export_trainable(
            {k: v for k, v in import_videollama_checkpoint(path)[0].items()}, vit_g("7b"), tmp_path / "x"
        )


def test_export_and_load_into_a_tiny_model(tmp_path):
    torch.manual_seed(0)
    trained = VideoLLaMA(tiny())
    export_trainable(trained, tiny(), tmp_path / "export")
    to_videollama_checkpoint(trained.trainable_state_dict(), tmp_path / "tiny.pth")
    for src in (tmp_path / "export", tmp_path / "tiny.pth"):
        torch.manual_seed(1)
        fresh = VideoLLaMA(tiny())
        report = load_trainable_weights(fresh, src)
        assert len(report.loaded) == len(trained.trainable_state_dict())
        want = trained.trainable_state_dict()
        assert all(torch.equal(v, want[k]) for k, v in fresh.trainable_state_dict().items())


# ---- frozen encoder ---------------------------------------------------------------------------------


def eva_state(cfg, extra_block=True, seed=0):
    """A raw EVA ViT state dict (``eva_vit_g.pth`` names) for ``cfg``'s sizes, one block too many."""
    w, mlp, grid = cfg.vision_width, cfg.vision_mlp, cfg.image_size // cfg.patch_size
    shapes = {
        "cls_token": (1, 1, w),
        "pos_embed": (1, grid * grid + 1, w),
        "patch_embed.proj.weight": (w, 3, cfg.patch_size, cfg.patch_size),
        "patch_embed.proj.bias": (w,),
    }
    for i in range(cfg.vision_layers + int(extra_block)):
        block = {"norm1.weight": (w,), "norm1.bias": (w,), "norm2.weight": (w,), "norm2.bias": (w,)}
        block |= {"attn.qkv.weight": (3 * w, w), "attn.q_bias": (w,), "attn.v_bias": (w,)}
        block |= {"attn.proj.weight": (w, w), "attn.proj.bias": (w,)}
        block |= {
            "mlp.fc1.weight": (mlp, w),
            "mlp.fc1.bias": (mlp,),
            "mlp.fc2.weight": (w, mlp),
            "mlp.fc2.bias": (w,),
        }
        shapes |= {f"blocks.{i}.{k}": v for k, v in block.items()}
    sd = random_state(shapes, seed)
    return {k: v * 0.1 if "weight" in k and "norm" not in k else v for k, v in sd.items()}


def eva_forward(sd, cfg, x):
    """EVA ViT forward written from the original code (pre-norm blocks, qkv bias = q, 0, v)."""
    w, heads, eps = cfg.vision_width, cfg.vision_heads, cfg.vision_eps
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=cfg.patch_size)
    x = torch.cat([sd["cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1) + sd["pos_embed"]
    for i in range(cfg.vision_layers):
        p = {k.removeprefix(f"blocks.{i}."): v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        h = F.layer_norm(x, (w,), p["norm1.weight"], p["norm1.bias"], eps)
        bias = torch.cat([p["attn.q_bias"], torch.zeros(w), p["attn.v_bias"]])
        q, k, v = (
            F.linear(h, p["attn.qkv.weight"], bias)
            .reshape(len(x), -1, 3, heads, w // heads)
            .permute(2, 0, 3, 1, 4)
        )
        attn = ((q * (w // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        x = x + F.linear(
            (attn @ v).transpose(1, 2).reshape(len(x), -1, w), p["attn.proj.weight"], p["attn.proj.bias"]
        )
        h = F.layer_norm(x, (w,), p["norm2.weight"], p["norm2.bias"], eps)
        x = x + F.linear(
            F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"])),
            p["mlp.fc2.weight"],
            p["mlp.fc2.bias"],
        )
    return x


def lavis_blip2_state(cfg, seed=1):
    """``blip2_pretrained_*.pth["model"]`` for ``cfg``: Q-Former with its text parts, ln_vision, queries."""
    d, w = cfg.feature_dim, cfg.vision_width
    shapes = {
        "query_tokens": (1, cfg.num_query_tokens, d),
        "ln_vision.weight": (w,),
        "ln_vision.bias": (w,),
        "Qformer.bert.embeddings.LayerNorm.weight": (d,),
        "Qformer.bert.embeddings.LayerNorm.bias": (d,),
        "Qformer.bert.embeddings.word_embeddings.weight": (30523, d),
        "Qformer.bert.embeddings.position_embeddings.weight": (512, d),
        "Qformer.cls.predictions.bias": (30523,),
        "vision_proj.weight": (256, d),
    }
    for i in range(cfg.qformer_layers):
        cross = i % cfg.qformer_cross_every == 0
        shapes |= _bert_layer_shapes("Qformer.bert", i, d, cfg.qformer_ffn, enc=w, cross=cross, text_ffn=True)
    return random_state(shapes, seed) | {"Qformer.bert.embeddings.position_ids": torch.arange(512)[None]}


def test_lavis_files_load_and_match_the_eva_forward(tmp_path):
    cfg = tiny()
    eva, blip2 = eva_state(cfg), lavis_blip2_state(cfg)
    torch.save(eva, tmp_path / "eva_vit_g.pth")
    torch.save({"model": blip2}, tmp_path / "blip2_pretrained_flant5xxl.pth")
    cfg.eva_vit_path, cfg.qformer_lavis_path = (
        str(tmp_path / "eva_vit_g.pth"),
        str(tmp_path / "blip2_pretrained_flant5xxl.pth"),
    )
    model = VideoLLaMA(cfg).eval()
    report = load_frozen_encoder(model)

    assert report.missing == [] and report.unexpected == ["vision_proj.weight"]
    assert f"blocks.{cfg.vision_layers}.attn.qkv.weight" in report.ignored  # EVA-CLIP's extra block
    assert "Qformer.bert.encoder.layer.1.intermediate.dense.weight" in report.ignored  # text FFN
    assert len(report.loaded) == len(model.state_dict()) - len(model.trainable_state_dict()) - len(
        model.llm.state_dict()
    )

    x = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    ours = model.visual_encoder(pixel_values=x).last_hidden_state
    ref = F.layer_norm(
        eva_forward(eva, cfg, x),
        (cfg.vision_width,),
        blip2["ln_vision.weight"],
        blip2["ln_vision.bias"],
        1e-5,  # the original's ln_vision is a torch LayerNorm with its default eps (the ViT's are 1e-6)
    )
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    qf = model.qformer.encoder.layer[0]
    assert torch.equal(
        qf.crossattention.attention.key.weight,
        blip2["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"],
    )
    assert torch.equal(
        qf.output_query.LayerNorm.bias, blip2["Qformer.bert.encoder.layer.0.output_query.LayerNorm.bias"]
    )
    assert torch.equal(model.qformer.layernorm.weight, blip2["Qformer.bert.embeddings.LayerNorm.weight"])
    assert torch.equal(model.query_tokens, blip2["query_tokens"])


def test_hf_blip2_directory_sharded_with_legacy_biases(tmp_path):
    torch.manual_seed(0)
    source = VideoLLaMA(tiny())
    hf = {}
    for k, v in source.state_dict().items():
        if k.startswith("visual_encoder."):
            hf["vision_model." + k.removeprefix("visual_encoder.")] = v
        elif k.startswith(("qformer.", "query_tokens")):
            hf[k] = v
    w = tiny().vision_width
    bias = torch.randn(3 * w)
    bias[w : 2 * w] = 0  # there is no k bias
    source.visual_encoder.encoder.layers[0].self_attn.qkv.bias.data.copy_(bias)
    del hf["vision_model.encoder.layers.0.self_attn.qkv.bias"]  # stored the old way: q_bias + v_bias
    (
        hf["vision_model.encoder.layers.0.self_attn.q_bias"],
        hf["vision_model.encoder.layers.0.self_attn.v_bias"],
    ) = bias[:w], bias[2 * w :]
    hf["language_projection.weight"] = torch.zeros(2, 2)
    names = sorted(hf)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: hf[k].contiguous() for k in keys}, str(tmp_path / file))
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    cfg = tiny()
    cfg.blip2_path = str(tmp_path)
    torch.manual_seed(1)
    target = VideoLLaMA(cfg).eval()
    report = load_frozen_encoder(target)
    assert isinstance(report, LoadReport) and report.missing == [] and report.unexpected == []
    want, got = source.state_dict(), target.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in report.loaded)
    clip = torch.randn(1, 3, 2, 56, 56)
    assert torch.equal(target.encode_frames(clip), source.eval().encode_frames(clip))


def test_encoder_without_weights_or_with_holes_is_an_error(tmp_path):
    with pytest.raises(WeightsError, match="names no encoder weights"):
        load_frozen_encoder(VideoLLaMA(tiny()))
    cfg = tiny()
    eva = eva_state(cfg)
    del eva["blocks.1.mlp.fc2.bias"]
    torch.save(eva, tmp_path / "eva.pth")
    torch.save({"model": lavis_blip2_state(cfg)}, tmp_path / "blip2.pth")
    cfg.eva_vit_path, cfg.qformer_lavis_path = str(tmp_path / "eva.pth"), str(tmp_path / "blip2.pth")
    with pytest.raises(WeightsError, match=r"visual_encoder\.encoder\.layers\.1\.mlp\.fc2\.bias"):
        load_frozen_encoder(VideoLLaMA(cfg))


@pytest.mark.slow  # several CLI processes, each importing torch
def test_convert_cli(released_7b, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    path, original = released_7b
    r = subprocess.run(
        [sys.executable, "cli.py", "convert", str(path), str(tmp_path / "exp")],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert f"loaded {len(original)} tensors" in r.stdout and "position_ids" in r.stdout
    r = subprocess.run(
        [sys.executable, "cli.py", "convert", str(tmp_path / "exp"), str(tmp_path / "b.pth")],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    back = torch_load(tmp_path / "b.pth")["model"]
    assert all(torch.equal(back[k], original[k]) for k in original)
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"llama_proj.weight": torch.zeros(5120, 768)}}, bad)
    r = subprocess.run(
        [sys.executable, "cli.py", "convert", str(bad), str(tmp_path / "x")],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    assert (
        r.returncode == 1
        and "Error: cannot infer the model config" in r.stderr
        and "video_query_tokens" in r.stderr
    )


def test_export_of_a_model_with_llm_checkpointing(tmp_path):
    """The export's shape check builds the model without an LLM; checkpointing must not get in the way."""
    cfg = tiny()
    cfg.llm_gradient_checkpointing = True
    model = VideoLLaMA(cfg)
    export_trainable(model, cfg, tmp_path / "exp")
    sd, back = load_trainable(tmp_path / "exp")
    assert back.llm_gradient_checkpointing and torch.equal(sd["llama_proj.weight"], model.llama_proj.weight)


def _convert_cli(*args):
    from click.testing import CliRunner

    import cli

    r = CliRunner().invoke(cli.main, ["convert", *map(str, args)])
    r.returncode = r.exit_code
    return r


def test_tiny_export_to_pth_and_back_keeps_the_preset(tmp_path):
    """export -> .pth -> export for the tiny preset: the .pth carries the ModelConfig; a .pth without it
    (as released files are) converts with --preset."""
    torch.manual_seed(0)
    model = VideoLLaMA(tiny())
    export_trainable(model, tiny(), tmp_path / "a")
    r = _convert_cli(tmp_path / "a", tmp_path / "tiny.pth")
    assert r.returncode == 0, r.stderr
    r = _convert_cli(tmp_path / "tiny.pth", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    sd_a, cfg_a = load_trainable(tmp_path / "a")
    sd_b, cfg_b = load_trainable(tmp_path / "b")
    assert cfg_b == cfg_a == tiny()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    bare = tmp_path / "bare.pth"  # the original's layout: {"model": ...} only
    torch.save({"model": torch_load(tmp_path / "tiny.pth")["model"]}, bare)
    r = _convert_cli(bare, tmp_path / "c", "--preset", "tiny")
    assert r.returncode == 0, r.stderr
    sd_c, cfg_c = load_trainable(tmp_path / "c")
    assert cfg_c == tiny() and all(torch.equal(sd_a[k], sd_c[k]) for k in sd_a)


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_hostile_or_garbage_pth_is_one_line_and_never_advises_unsafe_loading(tmp_path):
    import pickle
    import random

    marker = tmp_path / "code_ran"
    hostile = tmp_path / "hostile.pth"
    torch.save({"model": {"llama_proj.weight": torch.zeros(2, 2)}, "x": _Payload(str(marker))}, hostile)
    raw_pickle = tmp_path / "raw_pickle.pth"
    raw_pickle.write_bytes(pickle.dumps(_Payload(str(marker))))
    garbage = {}  # seeded random bytes that torch.load fails on in four different ways
    for seed, error in (
        (0, "UnpicklingError"),
        (2, "IndexError"),
        (20, "KeyError"),
        (195, "UnicodeDecodeError"),
    ):
        garbage[seed] = tmp_path / f"garbage_{error}.pth"
        garbage[seed].write_bytes(random.Random(seed).randbytes(4096))
    empty = tmp_path / "empty.pth"
    empty.touch()
    not_sd = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_sd)
    cases = {
        hostile: "not loadable safely",
        raw_pickle: "not loadable safely",
        **{path: "not a Video-LLaMA/LAVIS checkpoint" for path in garbage.values()},
        empty: "not a Video-LLaMA/LAVIS checkpoint",
        not_sd: "not a Video-LLaMA/LAVIS checkpoint",
    }
    for path, says in cases.items():
        r = _convert_cli(path, tmp_path / "out")
        err = r.stderr.strip()
        assert r.returncode == 1 and err.startswith(f"Error: {path}") and says in err, (path, err)
        assert len(err.splitlines()) == 1 and "weights_only" not in err and "Traceback" not in err
        with pytest.raises(WeightsError, match=says):
            import_videollama_checkpoint(path)
    assert not marker.exists()


@pytest.fixture(scope="module")
def tiny_pth(tmp_path_factory):
    """A tiny model's export and the .pth converted from it (which carries its ModelConfig)."""
    root = tmp_path_factory.mktemp("tiny_convert")
    torch.manual_seed(0)
    export_trainable(VideoLLaMA(tiny()), tiny(), root / "export")
    assert _convert_cli(root / "export", root / "tiny.pth").returncode == 0
    return root / "export", root / "tiny.pth"


def _altered_pth(src, dst, change):
    ckpt = torch_load(src)
    change(ckpt["model"])
    torch.save(ckpt, dst)
    return dst


def _set(key, value):
    return lambda sd: sd.__setitem__(key, value(sd[key]))


def _nan(t):
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return t


@pytest.mark.parametrize(
    "change, says",
    [
        (_set("llama_proj.bias", _nan), "1 tensor(s) hold NaN or inf: llama_proj.bias"),
        (
            _set("video_query_tokens", lambda t: t.index_fill(1, torch.tensor([0]), float("inf"))),
            "NaN or inf",
        ),
        (_set("llama_proj.weight", lambda t: t.to(torch.int32)), "llama_proj.weight (int32)"),
        (_set("llama_proj.weight", lambda t: t > 0), "llama_proj.weight (bool)"),
        (_set("llama_proj.weight", lambda t: t.half()), "llama_proj.weight (float16); --cast-float32"),
        (lambda sd: sd.pop("llama_proj.bias"), "lacks 1 trainable tensor(s): llama_proj.bias"),
        (lambda sd: sd.update(audio_query_tokens=torch.ones(4)), "1 tensor(s) that are not trainable"),
    ],
    ids=["nan", "inf", "int32", "bool", "fp16", "missing", "extra"],
)
def test_convert_refuses_what_a_run_cannot_start_from_in_one_line(tiny_pth, tmp_path, change, says):
    """NaN/inf, integer/bool/fp16 tensors, a missing and an extra tensor: each one line, nothing written
    (all used to convert with exit status 0)."""
    bad = _altered_pth(tiny_pth[1], tmp_path / "bad.pth", change)
    r = _convert_cli(bad, tmp_path / "out")
    err = r.stderr.strip()
    assert r.returncode == 1 and len(err.splitlines()) == 1 and err.startswith(f"Error: {bad}"), err
    assert says in err and not (tmp_path / "out").exists()


def test_convert_casts_fp16_only_when_asked_and_refuses_a_bad_export(tiny_pth, tmp_path):
    export, pth = tiny_pth
    half = _altered_pth(pth, tmp_path / "half.pth", _set("llama_proj.weight", lambda t: t.half()))
    r = _convert_cli(half, tmp_path / "cast", "--cast-float32")
    assert r.returncode == 0, r.stderr
    sd, _ = load_trainable(tmp_path / "cast")
    want = torch_load(half)["model"]["llama_proj.weight"].float()
    assert sd["llama_proj.weight"].dtype == torch.float32 and torch.equal(sd["llama_proj.weight"], want)
    # an export with a NaN, or cut short, is refused in the other direction too
    nan_export = tmp_path / "nan_export"
    nan_export.mkdir()
    (nan_export / "model.yaml").write_bytes((export / "model.yaml").read_bytes())
    tensors, _ = load_trainable(export)
    save_file(
        {**tensors, "llama_proj.bias": _nan(tensors["llama_proj.bias"])}, nan_export / "trainable.safetensors"
    )
    cut = tmp_path / "cut_export"
    cut.mkdir()
    (cut / "model.yaml").write_bytes((export / "model.yaml").read_bytes())
    data = (export / "trainable.safetensors").read_bytes()
    (cut / "trainable.safetensors").write_bytes(data[: len(data) // 2])
    for src, says in ((nan_export, "hold NaN or inf: llama_proj.bias"), (cut, "not a readable safetensors")):
        r = _convert_cli(src, tmp_path / f"{src.name}.pth")
        err = r.stderr.strip()
        assert r.returncode == 1 and len(err.splitlines()) == 1 and says in err, err
        assert "Traceback" not in r.output and not (tmp_path / f"{src.name}.pth").exists()
