"""The model: real-size parameter counts on the meta device, and the tiny preset end to end on CPU."""

import dataclasses
import math

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.model import (
    TRAINABLE,
    FrozenEncoder,
    ModelConfig,
    VideoLLaMA,
    preset,
    sinusoidal_positions,
    tiny,
    vit_g,
)
from pipeline.prompts import caption_sample, collate, conversation_sample, load_tokenizer
from standins.synthetic import write_tiny_llm


@pytest.mark.parametrize(
    ("name", "trainable", "llm"),
    [("vit-g-7b", 22_104_064, 6_738_415_616), ("vit-g-13b", 22_891_520, 13_015_864_320)],
)
def test_real_size_parameter_counts(name, trainable, llm):
    with torch.device("meta"):
        model = VideoLLaMA(preset(name))
    assert sum(p.numel() for _, p in model.trainable_parameters()) == trainable
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    assert sum(p.numel() for p in model.llm.parameters()) == llm  # LLaMA-7B / 13B
    assert sum(p.numel() for p in model.visual_encoder.parameters()) == 985_952_256  # EVA ViT-g, 39 blocks
    assert model.video_query_tokens.shape == (1, 32, 768)
    assert model.llm.dtype == torch.bfloat16


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return VideoLLaMA(tiny()).eval()


def _batch(n_frames=3, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    clip = torch.randn(batch, 3, n_frames, 56, 56, generator=g)
    ids = torch.randint(3, 1000, (batch, 40), generator=g)
    video_mask = torch.zeros(batch, 40, dtype=torch.bool)
    video_mask[:, 1:33] = True
    ids[video_mask] = 1000  # the placeholder id lies outside the LLM vocabulary, as on LLaMA
    labels = ids.masked_fill(torch.arange(40) < 33, -100)
    return clip, dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), video_mask=video_mask, labels=labels
    )


def test_shapes_and_ln_vision(tiny_model):
    clip, _ = _batch()
    features = tiny_model.encode_frames(clip)
    assert features.shape == (2, 3, 32, 64) and not features.requires_grad
    assert tiny_model.video_tokens(features).shape == (2, 32, 64)
    assert tiny_model.ln_vision is tiny_model.visual_encoder.post_layernorm


def test_clip_and_cached_features_give_identical_loss(tiny_model):
    clip, text = _batch()
    from_clip = tiny_model(clip=clip, **text)
    from_cache = tiny_model(features=tiny_model.encode_frames(clip), **text)
    assert torch.equal(from_clip.logits, from_cache.logits)
    assert from_clip.loss.item() == from_cache.loss.item()
    # random init predicts ~uniformly over the 1000-token vocabulary
    assert from_clip.loss.item() == pytest.approx(math.log(1000), abs=0.1)


def test_cached_features_in_fp16_are_accepted(tiny_model):
    clip, text = _batch()
    features = tiny_model.encode_frames(clip)
    full = tiny_model(features=features, **text).loss
    half = tiny_model(features=features.half(), **text).loss
    assert half.item() == pytest.approx(full.item(), abs=1e-3)


def test_only_trainable_parts_train():
    torch.manual_seed(0)
    model = VideoLLaMA(tiny())
    model.train()
    assert model.video_qformer.training and not model.qformer.training
    assert not model.visual_encoder.training and not model.llm.training
    clip, text = _batch()
    model(clip=clip, **text).loss.backward()
    grads = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    assert grads == set(TRAINABLE)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in model.trainable_parameters())
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and n.split(".")[0] not in TRAINABLE]
    assert frozen == []


def test_dropout_only_in_train_mode():
    torch.manual_seed(0)
    model = VideoLLaMA(tiny())
    clip, text = _batch()
    features = model.encode_frames(clip)
    model.eval()
    a, b = (model(features=features, **text).loss.item() for _ in range(2))
    assert a == b
    model.train()
    c, d = (model(features=features, **text).loss.item() for _ in range(2))
    assert c != d  # video Q-Former dropout 0.1


def test_wrong_video_position_count_raises(tiny_model):
    clip, text = _batch()
    text["video_mask"][0, 1] = False
    with pytest.raises(ValueError, match="32 video positions"):
        tiny_model(clip=clip, **text)
    with pytest.raises(ValueError, match="exactly one"):
        tiny_model(**text)


def test_too_many_frames_raise(tiny_model):
    with pytest.raises(ValueError, match="frame position embedding"):
        tiny_model.video_tokens(torch.zeros(1, 33, 32, 64))


def test_frame_position_init_is_the_originals_unless_asked_for_ordered_codes():
    """The original's nn.Embedding init (N(0, 1), frames unrelated) by default; "sinusoidal" (the tiny
    recipe's, docs/LEARNING.md) gives codes of the same scale where neighbouring frames are closest."""
    torch.manual_seed(0)
    normal = VideoLLaMA(tiny()).video_frame_position_embedding.weight.detach()
    assert abs(normal.std().item() - 1) < 0.05 and abs(normal.mean().item()) < 0.05
    torch.manual_seed(0)
    model = VideoLLaMA(dataclasses.replace(tiny(), frame_position_init="sinusoidal"))
    codes = model.video_frame_position_embedding.weight.detach()
    assert torch.equal(codes, sinusoidal_positions(32, 64))
    assert codes.pow(2).mean().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(
        codes[3, 0::2], torch.sin(3 / 10000 ** (torch.arange(0, 64, 2) / 64)) * math.sqrt(2)
    )
    distance = torch.cdist(codes[:8], codes[:8])  # frames 0..7, what a clip of 8 frames uses
    for t in range(1, 7):  # each frame's nearest other frames are its neighbours
        others = distance[t].clone()
        others[t] = math.inf
        assert set(others.topk(2, largest=False).indices.tolist()) == {t - 1, t + 1}
    assert model.video_frame_position_embedding.weight.requires_grad  # an init, still trained
    with pytest.raises(ConfigError, match="frame_position_init"):
        load_config(ModelConfig, None, ["frame_position_init=ramp"])


def test_config_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("llm_hidden_size: 5120\nllm_layers: 40\nllm_heads: 40\n")
    cfg = load_config(ModelConfig, path, ["max_frames=64"])
    assert (cfg.llm_hidden_size, cfg.max_frames, cfg.feature_dim) == (5120, 64, 768)
    with pytest.raises(ConfigError, match="not divisible"):
        load_config(ModelConfig, None, ["feature_dim=100"])
    with pytest.raises(ConfigError, match="not both"):
        load_config(ModelConfig, None, ["blip2_path=a", "eva_vit_path=b", "qformer_lavis_path=c"])
    with pytest.raises(ConfigError, match="unknown model preset"):
        preset("vit-g-70b")
    assert vit_g("13b").llm_intermediate_size == 13824
    assert tiny().encoder_fingerprint() != vit_g().encoder_fingerprint()
    assert (
        vit_g("7b").encoder_fingerprint() == vit_g("13b").encoder_fingerprint()
    )  # the cache is LLM-agnostic


def test_local_llm_directory_and_tokenizer(tmp_path):
    """A saved HF Llama + tokenizer: loaded in bf16, embeddings not resized, prompts run through it."""
    llm_dir = write_tiny_llm(tmp_path / "llm")
    tokenizer = load_tokenizer(str(llm_dir))
    cfg = tiny()
    cfg.llm_path, cfg.llm_dtype = str(llm_dir), "bfloat16"
    torch.manual_seed(0)
    model = VideoLLaMA(cfg).eval()
    vocab = model.llm.get_input_embeddings().weight.shape[0]
    image_id = tokenizer.convert_tokens_to_ids("<ImageHere>")
    assert model.llm.dtype == torch.bfloat16 and image_id == vocab == len(tokenizer) - 1
    assert tokenizer.pad_token_id == tokenizer.unk_token_id == 0

    samples = [
        caption_sample(tokenizer, "a man is riding a horse on the beach."),
        conversation_sample(tokenizer, [("What is happening?", "two dogs play.")], template="vicuna"),
    ]
    batch = collate(samples, tokenizer.pad_token_id)
    clip = torch.randn(2, 3, 2, 56, 56)
    loss = model(clip=clip, **batch).loss
    assert torch.isfinite(loss) and loss.item() == pytest.approx(math.log(vocab), abs=0.5)

    cfg.llm_hidden_size = 128
    with pytest.raises(ConfigError, match="hidden size 64"):
        VideoLLaMA(cfg)


def test_training_from_cached_features_can_drop_the_frozen_encoder():
    """Features in, same loss, and the ViT + image Q-Former are gone (they never run on features)."""
    import pytest

    from pipeline.model import VideoLLaMA, tiny

    torch.manual_seed(0)
    model = VideoLLaMA(tiny()).eval()
    clip = torch.randn(2, 3, 4, 56, 56)
    features = model.encode_frames(clip)
    ids = torch.randint(3, 900, (2, 40))
    video_mask = torch.zeros(2, 40, dtype=torch.bool)
    video_mask[:, 1:33] = True
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "video_mask": video_mask,
        "labels": ids,
    }
    before = model(**batch, features=features).loss
    n = sum(p.numel() for p in model.parameters())
    freed = model.drop_frozen_encoder()
    assert freed > 0 and sum(p.numel() for p in model.parameters()) == n - freed
    assert torch.equal(model(**batch, features=features).loss, before)
    with pytest.raises(RuntimeError, match="dropped its frozen encoder"):
        model(**batch, clip=clip)


def test_llm_gradient_checkpointing_gives_the_same_loss_and_gradients():
    from pipeline.model import VideoLLaMA, tiny

    batches = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = tiny()
        cfg.llm_gradient_checkpointing = checkpointing
        cfg.dropout = 0.0  # compare the two runs exactly
        model = VideoLLaMA(cfg).train()
        assert model.llm.training == checkpointing and not model.visual_encoder.training
        torch.manual_seed(1)
        ids = torch.randint(3, 900, (2, 40))
        mask = torch.zeros(2, 40, dtype=torch.bool)
        mask[:, 1:33] = True
        feats = torch.randn(2, 4, 32, 64)
        out = model(ids, torch.ones_like(ids), mask, labels=ids, features=feats)
        out.loss.backward()
        batches.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.trainable_parameters()}))
    (l0, g0), (l1, g1) = batches
    assert torch.equal(l0, l1)
    assert all(torch.allclose(g0[n], g1[n], atol=1e-6) for n in g0) and any(g0[n].abs().sum() > 0 for n in g0)


def test_the_random_tiny_encoder_is_not_degenerate():
    """transformers' Blip2VisionConfig defaults to initializer_range=1e-10 and the image Q-Former's
    query tokens used to be zeros: the ViT was ~0 and the 32 queries identical, so every frame collapsed
    to one pooled vector. Now: std-0.02 weights and position embeddings, 32 distinct queries."""
    from pipeline.model import FrozenEncoder

    enc = FrozenEncoder(tiny(), seed=0)
    emb = enc.visual_encoder.embeddings
    for t in (emb.patch_embedding.weight, emb.position_embedding, enc.query_tokens):
        assert 0.015 < t.std().item() < 0.025
    clip = torch.randn(2, 3, 4, 56, 56)
    feats = enc(clip)  # [B, T, 32, D]
    spread = feats.std(dim=2).mean().item()  # across the 32 queries of one frame
    assert spread > 0.05, spread
    # what the frame shows reaches the features: two different frames, different features
    assert (feats[0, 0] - feats[1, 0]).abs().mean().item() > 1e-3


def test_vit_precision_is_the_originals():
    """convert_weights_to_fp16: Linear/Conv weights fp16; LayerNorms, embeddings and ln_vision fp32,
    ln_vision with torch's default eps 1e-5; every op runs in its weights' dtype (CPU, no autocast)."""
    cfg = dataclasses.replace(tiny(), vision_dtype="float16")
    vit = FrozenEncoder(cfg).visual_encoder
    dtypes = {n: p.dtype for n, p in vit.named_parameters()}
    linear = {n for n, m in vit.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    for name, dtype in dtypes.items():
        owner = name.rpartition(".")[0]
        assert dtype == (torch.float16 if owner in linear else torch.float32), name
    assert {dtypes["embeddings.class_embedding"], dtypes["embeddings.position_embedding"]} == {torch.float32}
    ln = vit.post_layernorm
    assert ln.eps == 1e-5 and ln.weight.dtype == torch.float32
    assert all(m.eps == 1e-6 for n, m in vit.encoder.named_modules() if isinstance(m, torch.nn.LayerNorm))

    x = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    seen = {}
    hooks = [
        m.register_forward_hook(lambda m, a, out, n=n: seen.__setitem__(n, (a[0].dtype, out.dtype)))
        for n, m in vit.named_modules()
        if n in ("encoder.layers.0.layer_norm1", "encoder.layers.0.mlp.fc1", "post_layernorm")
    ]
    out = vit(pixel_values=x).last_hidden_state
    for h in hooks:
        h.remove()
    # the residual stream is fp32 (fp16 Linear outputs promote when added), Linears compute in fp16
    assert seen["encoder.layers.0.layer_norm1"] == (torch.float32, torch.float32)
    assert seen["encoder.layers.0.mlp.fc1"] == (torch.float16, torch.float16)
    assert seen["post_layernorm"] == (torch.float32, torch.float32) and out.dtype == torch.float32
    # the same weights in fp32 everywhere: the fp16 Linears move the tokens by fp16 rounding only
    ref = FrozenEncoder(tiny()).visual_encoder
    ref.load_state_dict(vit.state_dict())
    torch.testing.assert_close(out, ref(pixel_values=x).last_hidden_state, atol=2e-2, rtol=0)
