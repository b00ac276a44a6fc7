"""uvit.py: presets and their sizes, shapes, conditioning paths, zero init, activation checkpointing."""
import dataclasses

import pytest
import torch

import uvit

# Parameter counts documented in uvit.PRESETS and the README (computed on the meta device).
PARAMS = {"sid-b-256": 391_576_067, "sid-l-256": 1_116_570_627, "semantica-512": 4_035_408_387,
          "tiny-32": 2_007_779, "small-64": 10_163_363}
# A very small network for fast CPU checks: 16 px, one conv level, a 2-block transformer at 8x8.
MICRO = uvit.UViTConfig(image_size=16, channels=(16,), blocks=(1,), transformer_levels=0, width=32, depth=2,
                        head_dim=16, cond_dim=24, dropout=0.0)


def randomize(model, seed=0):
    """Random weights everywhere (zero-initialised output layers would hide every dependency)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def inputs(cfg, b=2, t_c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    z_t = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g)
    cond = torch.randn((b, t_c, cfg.cond_dim) if cfg.conditioning == "cross_attention" else (b, cfg.cond_dim), generator=g)
    return z_t, torch.rand(b, generator=g), cond


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_preset_builds_with_documented_parameter_count(name):
    cfg = uvit.PRESETS[name]
    with torch.device("meta"):
        net = uvit.UViT(cfg)
    assert sum(p.numel() for p in net.parameters()) == PARAMS[name]
    assert cfg.lowest_size == (8 if name in ("tiny-32", "small-64") else 16)  # §6.1: lowest map 16x16


def test_paper_presets_follow_section_6_1():
    b, f = uvit.PRESETS["sid-b-256"], uvit.PRESETS["semantica-512"]
    assert (b.patch_size, b.channels, b.blocks, b.width, b.depth) == (1, (128, 128, 256, 512), (3, 3, 3, 3), 1024, 16)
    assert (f.patch_size, (*f.channels, f.width), (*f.blocks, f.depth)) == (2, (128, 256, 1024, 2048, 4096), (2, 3, 3, 3, 12))
    for cfg in (b, f):  # transformers at the two lowest resolutions, 32x32 and 16x16
        assert cfg.transformer_levels == 1 and cfg.image_size // cfg.patch_size // 2 ** (len(cfg.channels) - 1) == 32
        assert cfg.head_dim == 64  # flash-attention friendly
    # cross-attention only in the lowest-resolution transformer (§3.4)
    with torch.device("meta"):
        net = uvit.UViT(b)
    cross = [n for n, m in net.named_modules() if isinstance(m, uvit.Attention) and m.cross]
    assert len(cross) == b.depth and all(n.startswith("mid_transformer.") for n in cross)


@pytest.mark.parametrize("name", ["tiny-32", "small-64"])
def test_output_shape_and_zero_init(name):
    cfg = uvit.PRESETS[name]
    net = uvit.UViT(cfg)
    z_t, t, cond = inputs(cfg, t_c=65)
    v = net(z_t, t, cond)
    assert v.shape == z_t.shape and v.dtype == torch.float32
    assert torch.all(v == 0)  # zero-initialised output layer: the untrained network predicts v = 0


def test_patchify_stem_shape():
    cfg = dataclasses.replace(MICRO, image_size=32, patch_size=2)  # the 512-px layout in miniature
    z_t, t, cond = inputs(cfg)
    assert randomize(uvit.UViT(cfg))(z_t, t, cond).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("conditioning", ["cross_attention", "film"])
def test_output_depends_on_condition_and_t_per_example(conditioning):
    cfg = dataclasses.replace(MICRO, conditioning=conditioning)
    net = randomize(uvit.UViT(cfg)).eval()
    z_t, t, cond = inputs(cfg)
    v = net(z_t, t, cond)
    other = cond.clone()
    other[0] = torch.randn_like(other[0])               # change example 0's condition only
    v2 = net(z_t, t, other)
    assert not torch.allclose(v[0], v2[0], atol=1e-4)     # the condition matters
    assert torch.allclose(v[1], v2[1], atol=1e-6)         # and does not leak across the batch
    v3 = net(z_t, t + 0.1, cond)
    assert not torch.allclose(v, v3, atol=1e-4)           # the noise level matters
    assert torch.allclose(net(z_t[:1], t[:1], cond[:1]), v[:1], atol=1e-5)  # batch-size independent
    with pytest.raises(ValueError, match="batch"):
        net(z_t, t, cond[:1])


def test_grad_checkpoint_gives_identical_gradients():
    cfg = dataclasses.replace(MICRO, channels=(16, 32), blocks=(1, 1), transformer_levels=1)  # conv + transformer
    net = randomize(uvit.UViT(cfg))
    z_t, t, cond = inputs(net.config)
    grads = []
    for flag in (False, True):
        net.grad_checkpoint = flag
        net.zero_grad()
        net(z_t, t, cond).square().mean().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_bf16_autocast_and_channels_last():
    net = randomize(uvit.UViT(MICRO))
    z_t, t, cond = inputs(MICRO)
    ref = net(z_t, t, cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = net(z_t.contiguous(memory_format=torch.channels_last), t, cond)
    assert v.shape == ref.shape and torch.isfinite(v).all()
    assert (v.float() - ref).abs().mean() < 0.05 * ref.abs().mean()
    v = net.to(torch.bfloat16)(z_t, t, cond)   # bf16 weights (FSDP mixed precision), float32 inputs
    assert v.dtype == torch.bfloat16 and (v.float() - ref).abs().mean() < 0.05 * ref.abs().mean()


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="conditioning"):
        uvit.UViTConfig(conditioning="concat")
    with pytest.raises(ValueError, match="divisible"):
        uvit.UViTConfig(image_size=200)
    with pytest.raises(ValueError, match="head_dim"):
        uvit.UViTConfig(width=1000)
