"""The memory planner (train/memory.py, ``cli.py plan``) and the random real-size weight folders
(standins/synthetic.py) with the meta-device encoder they load into."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from click.testing import CliRunner

from pipeline.model import PRESETS, FrozenEncoder, VideoLLaMA, preset, tiny, vision_for_device
from pipeline.weights import load_frozen_encoder
from train.memory import GB, llm_saved_bytes, param_counts, plan_memory


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_counts_match_the_modules(name):
    cfg = preset(name)
    with torch.device("meta"):
        model = VideoLLaMA(cfg)

    def count(prefix):
        return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))

    counts = param_counts(cfg)
    assert counts.vision == count("visual_encoder.")
    assert counts.image_qformer == count("qformer.") + count("query_tokens")
    assert counts.llm == count("llm.")
    assert counts.trainable == sum(p.numel() for _, p in model.trainable_parameters())
    if name == "vit-g-7b":
        assert (counts.trainable, counts.llm) == (22_104_064, 6_738_415_616)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_llm_activation_model_matches_what_autograd_saves(checkpointing):
    """The bytes of every tensor autograd keeps (parameters excluded, storages counted once) plus the
    logits the output holds, for a bf16 Llama with a padding mask, against the docstring's formula."""
    cfg = dataclasses.replace(
        tiny(),
        llm_hidden_size=256,
        llm_intermediate_size=688,
        llm_layers=4,
        llm_heads=4,
        llm_vocab_size=1000,
        llm_dtype="bfloat16",
        llm_gradient_checkpointing=checkpointing,
    )
    torch.manual_seed(0)
    model = VideoLLaMA(cfg).train()
    batch, seq = 2, 65
    embeds = torch.randn(batch, seq, 256, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 60:] = 0
    labels = torch.randint(0, 1000, (batch, seq))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False)
    measured = sum(saved.values()) + out.logits.nbytes
    predicted = batch * llm_saved_bytes(cfg, seq, checkpointing)
    assert measured / predicted == pytest.approx(1.0, abs=0.02), (measured, predicted)


def test_plan_13b_batch_4_and_7b_stage1():
    """The original's users ran out of memory with 13B at batch 4 (stage 2, frames through the ViT):
    that needs ~46.5 GB per GPU here, so it does not fit a 40 GB A100 and fits an 80 GB one."""
    p13 = plan_memory(preset("vit-g-13b"), gpus=8, input="frames", seq_len=512)
    assert p13.frozen_weights == 2 * (13_015_864_320 + 985_952_256 + 105_162_240)
    assert p13.total(4, False) / GB == pytest.approx(46.53, abs=0.01)
    assert p13.max_micro_batch(80 * GB, False) == 13
    assert p13.max_micro_batch(40 * GB, False) == 2
    assert p13.max_micro_batch(40 * GB, True) == 15  # (40 - 32.10 GB fixed) / 0.499 GB per sample
    p7 = plan_memory(preset("vit-g-7b"), gpus=8, input="features", seq_len=65)
    assert p7.frozen_weights == 2 * 6_738_415_616  # the encoder is never loaded on cached features
    assert p7.optimizer_states == 12 * 22_104_064 // 8
    assert p7.checkpoint_bytes == 12 * 22_104_064
    assert p7.total(32, False) / GB == pytest.approx(26.73, abs=0.01)
    assert p7.max_micro_batch(80 * GB, False) == 214


def test_plan_command(tmp_path):
    import cli

    result = CliRunner().invoke(
        cli.main,
        ["plan", "--config", "configs/stage2_vit-g_7b.yaml", "--gpus", "8", "--gpu-memory", "40"]
        + ["model_preset=vit-g-13b", "micro_batch=4", "data.input=frames"],
    )
    assert result.exit_code == 0, result.output
    assert "largest micro-batch without LLM checkpointing: 2 (micro_batch 4: 46.53 GB, DOES NOT FIT)" in (
        result.output
    )
    assert "LLM 13,015,864,320 params + ViT 985,952,256" in result.output
    bad = CliRunner().invoke(cli.main, ["plan", "--config", "configs/stage1_tiny.yaml", "--gpus", "0"])
    assert bad.exit_code != 0 and "--gpus must be >= 1" in bad.output


def test_llama_tokenizer_places_image_token_beyond_the_embedding():
    from pipeline.prompts import prepare_tokenizer
    from standins.synthetic import llama_tokenizer

    tok = llama_tokenizer(32000)
    assert (len(tok), tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (32000, 1, 2, 0)
    assert prepare_tokenizer(tok) == 32000
    assert tok.decode(tok("a man is riding a horse").input_ids) == "a man is riding a horse"


def test_meta_encoder_materialises_once_from_a_blip2_folder(tmp_path):
    """Weight paths: built on the meta device, materialised by the load, with the exact tensors a
    random-init-then-load gives; realistic scale (std 0.02) survives fp16; on a CPU it computes in fp32."""
    from standins.synthetic import write_blip2

    cfg = dataclasses.replace(tiny(), vision_dtype="float16", vision_width=128, vision_mlp=256)
    write_blip2(tmp_path, cfg)
    with_path = dataclasses.replace(cfg, blip2_path=str(tmp_path))
    meta = FrozenEncoder(with_path)
    assert all(p.is_meta for p in meta.parameters())
    with pytest.raises((NotImplementedError, RuntimeError)):
        meta(torch.zeros(1, 3, 2, 56, 56))  # used before its weights load: fails loudly
    load_frozen_encoder(meta)
    old = FrozenEncoder(cfg)  # the old way: random init, then the load copies over it
    old.cfg = with_path
    load_frozen_encoder(old)
    new_sd, old_sd = meta.state_dict(), old.state_dict()
    assert all(torch.equal(new_sd[k], old_sd[k]) and new_sd[k].dtype == old_sd[k].dtype for k in old_sd)
    fc1 = meta.visual_encoder.encoder.layers[0].mlp.fc1.weight
    assert fc1.dtype == torch.float16 and fc1.float().std().item() == pytest.approx(0.02, rel=0.05)
    assert not any(p.requires_grad for p in meta.parameters())
    fingerprint = meta.weights_fingerprint()
    clip = torch.randn(1, 3, 2, 56, 56)
    vision_for_device(meta, "cpu")
    assert meta.visual_encoder.embeddings.patch_embedding.weight.dtype == torch.float32
    features = meta(clip)
    assert features.std().item() > 0.1 and torch.isfinite(features).all()
    assert old.weights_fingerprint() == fingerprint  # hashed before the CPU cast, as the callers do


def test_feature_cache_vision_layers_is_part_of_the_encoder_identity():
    from pipeline.config import ConfigError
    from preprocess.config import FeatureCacheConfig

    full, shallow = FeatureCacheConfig().model_config(), FeatureCacheConfig(vision_layers=1).model_config()
    assert (full.vision_layers, shallow.vision_layers) == (39, 1)
    assert full.encoder_fingerprint() != shallow.encoder_fingerprint()  # a trainer of another depth refuses
    with pytest.raises(ConfigError, match="features.vision_layers must be >= 1"):
        FeatureCacheConfig(vision_layers=0).model_config()


@pytest.mark.parametrize(
    "args, says",
    [
        (["model.llm_layers=-32"], "model: sizes must be >= 1: llm_layers=-32"),
        (["model.llm_hidden_size=0"], "model: sizes must be >= 1: llm_hidden_size=0"),
        (["model.video_qformer_ffn=-1", "model.max_frames=0"], "video_qformer_ffn=-1, max_frames=0"),
        (["model.dropout=nan"], "model.dropout must be in [0, 1)"),
        (["--gpu-memory", "nan"], "--gpu-memory a finite number of GB > 0 (got 8, nan)"),
        (["--gpu-memory", "inf"], "--gpu-memory a finite number of GB > 0 (got 8, inf)"),
        (["--gpu-memory", "-1"], "--gpu-memory a finite number of GB > 0"),
    ],
)
def test_plan_refuses_impossible_sizes_in_one_line(args, says):
    """Negative sizes used to print negative GB that "fit"; nan/inf GPU memory ended in a traceback."""
    import cli

    r = CliRunner().invoke(cli.main, ["plan", "--config", "configs/stage1_vit-g_7b.yaml", *args])
    assert r.exit_code == 1 and r.exception is not None and isinstance(r.exception, SystemExit), r.output
    assert r.output.startswith("Error: ") and len(r.output.strip().splitlines()) == 1, r.output
    assert says in r.output and "fits" not in r.output
