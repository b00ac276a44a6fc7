"""uvit.py: presets and their sizes, shapes, conditioning paths, zero init, activation checkpointing."""
import dataclasses
import math

import pytest
import torch

import uvit

# Parameter counts documented in uvit.PRESETS and docs/training.md (computed on the meta device).
PARAMS = {"sid-b-256": 391_576_067, "sid-l-256": 1_116_570_627, "semantica-512": 4_035_408_387,
          "tiny-32": 2_007_779, "tiny-32-p2": 2_002_211, "small-64": 10_163_363}
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
    assert cfg.lowest_size == {"tiny-32": 8, "tiny-32-p2": 4, "small-64": 8}.get(name, 16)  # §6.1: lowest map 16x16


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
    with pytest.raises(ValueError, match="cond has batch 1 but z_t has batch 2"):
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
    small = dict(image_size=16, width=32, depth=1, head_dim=16, cond_dim=8)
    with pytest.raises(ValueError, match=r"blocks \(1,\) and transformer_levels 0 do not describe the same levels"):
        uvit.UViTConfig(channels=(16, 32), blocks=(1,), transformer_levels=0, **small)
    with pytest.raises(ValueError, match="do not describe the same levels"):
        uvit.UViTConfig(channels=(16,), blocks=(1,), transformer_levels=2, **small)
    with pytest.raises(ValueError, match="transformer width 24 is not a multiple of head_dim 16"):
        uvit.UViTConfig(channels=(16, 24), blocks=(1, 1), transformer_levels=1, **small)  # a transformer level
    with pytest.raises(ValueError, match=r"conv channels 10 must be a multiple of 4 and of min\(32, c // 4\)"):
        uvit.UViTConfig(channels=(10, 32), blocks=(1, 1), transformer_levels=1, **small)
    # the limits themselves are valid: every level a transformer; a transformer level whose width breaks
    # the conv-level GroupNorm rule (18 is not a multiple of 4) but is a multiple of head_dim
    uvit.UViTConfig(channels=(32,), blocks=(1,), transformer_levels=1, **small)
    uvit.UViTConfig(channels=(16, 18), blocks=(1, 1), transformer_levels=1, image_size=16, width=36, depth=1,
                    head_dim=6, cond_dim=8)


def test_position_embedding_is_learned_and_small_at_init():
    # DESIGN: a learned absolute embedding of the lowest-resolution tokens, initialised small.
    torch.manual_seed(0)
    net = uvit.UViT(REF)
    assert net.pos_embed.requires_grad and net.pos_embed.shape == (1, REF.lowest_size ** 2, REF.width)
    assert 0.015 < net.pos_embed.std().item() < 0.025 and net.pos_embed.abs().max().item() < 0.15


# ----------------------------------------------------------------------------- hand-built reference
# A second implementation of the forward pass, written from the module docstrings and the paper
# (§3.4, App. D; simple diffusion Fig. 7) with explicit per-head loops and hand-written norms. It
# reuses only the parameters of the network under test, never its forward code.
REF = uvit.UViTConfig(image_size=16, channels=(16, 32), blocks=(2, 1), transformer_levels=1, width=32, depth=2,
                      head_dim=16, cond_dim=24, dropout=0.0)  # conv level (2 blocks, skips) + transformer level + mid


def lin(layer, x):
    return x @ layer.weight.T + layer.bias


def layer_norm(norm, x):
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def group_norm(norm, x):
    b, c, h, w = x.shape
    g = x.reshape(b, norm.num_groups, -1)
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + norm.eps)
    return g.reshape(b, c, h, w) * norm.weight[:, None, None] + norm.bias[:, None, None]


def silu(x):
    return x / (1 + torch.exp(-x))


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / 2 ** 0.5))


def conv(layer, x):
    return torch.nn.functional.conv2d(x, layer.weight, layer.bias, stride=layer.stride, padding=layer.padding)


def conv_t(layer, x):
    return torch.nn.functional.conv_transpose2d(x, layer.weight, layer.bias, stride=layer.stride)


def ref_attention(attn, x, context=None):
    """softmax(LN(q_h) LN(k_h)^T / sqrt(d)) v_h per head h, heads concatenated, then the output projection."""
    dim = x.shape[-1]
    if context is None:
        q, k, v = lin(attn.qkv, x).split(dim, dim=-1)
    else:
        q, (k, v) = lin(attn.q, x), lin(attn.qkv, context).split(dim, dim=-1)
    d = dim // attn.heads
    heads = []
    for h in range(attn.heads):
        cols = slice(h * d, (h + 1) * d)
        qh, kh = layer_norm(attn.q_norm, q[..., cols]), layer_norm(attn.k_norm, k[..., cols])
        weights = torch.softmax(qh @ kh.transpose(-1, -2) / d ** 0.5, dim=-1)   # (B, N, T)
        heads.append(weights @ v[..., cols])
    return lin(attn.proj, torch.cat(heads, dim=-1))


def ref_transformer_block(blk, x, emb, context=None):
    x = x + ref_attention(blk.attn, layer_norm(blk.norm1, x))
    if context is not None:                                                   # §3.4: after every self-attention
        x = x + ref_attention(blk.cross_attn, layer_norm(blk.norm2, x), context)
    film = lin(blk.film, emb)
    scale, shift = film[:, None, :film.shape[1] // 2], film[:, None, film.shape[1] // 2:]
    return x + lin(blk.fc2, gelu(lin(blk.fc1, layer_norm(blk.norm3, x))) * (1 + scale) + shift)


def ref_resblock(blk, x, emb):
    h = conv(blk.conv1, silu(group_norm(blk.norm1, x)))
    film = lin(blk.film, emb)
    c = h.shape[1]
    h = silu(group_norm(blk.norm2, h) * (1 + film[:, :c, None, None]) + film[:, c:, None, None])
    shortcut = x if isinstance(blk.shortcut, torch.nn.Identity) else conv(blk.shortcut, x)
    return shortcut + conv(blk.conv2, h)


def ref_time_features(t, dim):
    half = dim // 2
    k = torch.arange(half, dtype=torch.float64)
    angles = 1000.0 * t.double()[:, None] * 10000.0 ** (-k / half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def ref_tokens(blocks, x, emb, context=None):
    b, c, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)                      # (B, h*w, C), row-major tokens
    for blk in blocks:
        x = ref_transformer_block(blk, x, emb, context)
    return x.transpose(1, 2).reshape(b, c, h, w)


def ref_uvit(net, z, t, cond):
    c = net.config
    emb = lin(net.time_embed[2], silu(lin(net.time_embed[0], ref_time_features(t, c.channels[0]).to(z.dtype))))
    context = None
    if c.conditioning == "film":   # App. D / §3.4: normalise the CLS token, dense projection, add to time
        emb = emb + lin(net.cond_embed[1], layer_norm(net.cond_embed[0], cond))
    else:
        context = layer_norm(net.cond_embed[2], lin(net.cond_embed[1], layer_norm(net.cond_embed[0], cond)))
    emb = silu(emb)
    x, skips = conv(net.stem, z), []
    for i, level in enumerate(net.down_levels):
        if net.is_transformer[i]:
            x = ref_tokens(level, x, emb)
        else:
            for blk in level:
                x = ref_resblock(blk, x, emb)
                skips.append(x)
        x = conv(net.downsamples[i], x)
    b, d, h, w = x.shape
    x = x.flatten(2).transpose(1, 2) + net.pos_embed
    for blk in net.mid_transformer:
        x = ref_transformer_block(blk, x, emb, context)
    x = x.transpose(1, 2).reshape(b, d, h, w)
    for i in reversed(range(len(net.up_levels))):
        x = conv_t(net.upsamples[i], x)
        if net.is_transformer[i]:
            x = ref_tokens(net.up_levels[i], x, emb)
        else:
            for blk in net.up_levels[i]:                  # U-Net skips, last pushed first popped
                x = ref_resblock(blk, torch.cat([x, skips.pop()], dim=1), emb)
    final = net.final_layer
    return conv_t(final[2], silu(group_norm(final[0], x)))


@pytest.mark.parametrize("conditioning", ["cross_attention", "film"])
def test_forward_matches_hand_built_reference(conditioning):
    cfg = dataclasses.replace(REF, conditioning=conditioning)
    net = randomize(uvit.UViT(cfg), seed=3).double().eval()
    z_t, t, cond = (a.double() for a in inputs(cfg, b=2, t_c=5, seed=4))
    got = net(z_t, t, cond)
    want = ref_uvit(net, z_t, t, cond)
    assert got.dtype == torch.float64 and got.shape == z_t.shape
    # time_features runs in float32 by design (angles up to 1000 rad): ~1e-6 differences, nothing more
    assert torch.allclose(got, want, rtol=0, atol=2e-5)
    assert want.abs().mean() > 0.1  # a non-trivial output


def test_attention_matches_per_head_reference_and_blocks_match_reference():
    g = torch.Generator().manual_seed(5)
    for cross in (False, True):
        attn = randomize(uvit.Attention(32, 8, cross=cross), seed=6).double()  # 4 heads of 8
        x, ctx = torch.randn(2, 7, 32, generator=g, dtype=torch.float64), torch.randn(2, 3, 32, generator=g, dtype=torch.float64)
        assert torch.allclose(attn(x, ctx if cross else None), ref_attention(attn, x, ctx if cross else None), atol=1e-10)
        blk = randomize(uvit.TransformerBlock(32, 8, 2, 12, 0.0, cross=cross), seed=7).double()
        emb = torch.randn(2, 12, generator=g, dtype=torch.float64)
        assert torch.allclose(blk(x, emb, ctx if cross else None), ref_transformer_block(blk, x, emb, ctx if cross else None),
                              atol=1e-10)
    for c_in, c_out in ((8, 8), (16, 8)):
        blk = randomize(uvit.ResBlock(c_in, c_out, 12), seed=8).double()
        x, emb = torch.randn(2, c_in, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 12, generator=g, dtype=torch.float64)
        assert torch.allclose(blk(x, emb), ref_resblock(blk, x, emb), atol=1e-10)


def test_time_features_closed_form():
    t = torch.tensor([0.0, 0.25, 1.0])
    f = uvit.time_features(t, 8)
    assert f.shape == (3, 8) and f.dtype == torch.float32
    assert torch.allclose(f.double(), ref_time_features(t, 8), atol=1e-4)
    # by hand: t = 0.25, first frequency 1 -> angle 250; last of four 10000^(-3/4) = 1e-3 -> angle 0.25
    assert f[1, 0].item() == pytest.approx(math.cos(250.0), abs=1e-4) and f[1, 7].item() == pytest.approx(math.sin(0.25), abs=1e-6)
    assert torch.equal(f[0], torch.tensor([1.0] * 4 + [0.0] * 4))


def test_cross_attention_uses_every_token_and_is_permutation_invariant():
    # §3.4: the decoder cross-attends to the encoder tokens X_c. With no positional encoding on the
    # context, attention is a symmetric function of the token set: permuting tokens changes nothing,
    # while changing any single token (first, middle or last) changes the prediction.
    net = randomize(uvit.UViT(MICRO), seed=1).double().eval()
    z_t, t, cond = (a.double() for a in inputs(MICRO, b=2, t_c=6, seed=2))
    v = net(z_t, t, cond)
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    assert torch.allclose(net(z_t, t, cond[:, perm]), v, atol=1e-10)
    for j in (0, 3, 5):
        other = cond.clone()
        other[0, j] = torch.randn(MICRO.cond_dim, generator=torch.Generator().manual_seed(j), dtype=torch.float64)
        v2 = net(z_t, t, other)
        assert (v2[0] - v[0]).abs().max() > 1e-4, j
        assert torch.allclose(v2[1], v[1], atol=1e-12)
    # duplicating the token set leaves every attention average unchanged (softmax over a multiset)
    assert torch.allclose(net(z_t, t, torch.cat([cond, cond], dim=1)), v, atol=1e-10)
    # DESIGN (module docstring): tokens -> LayerNorm -> Linear -> LayerNorm, so a per-token rescale is invisible
    assert (net(z_t, t, cond * 10.0) - v).abs().max() < 1e-4


def test_film_normalises_the_global_feature_then_projects_and_adds_to_time():
    # §3.4 / App. D: "we normalize the CLS token, embed it with a dense projection and add it to the
    # timescale embedding". Normalisation makes the prediction blind to the feature's scale (LayerNorm
    # also to a constant offset); its direction still matters.
    cfg = dataclasses.replace(MICRO, conditioning="film")
    net = randomize(uvit.UViT(cfg), seed=2).double().eval()
    z_t, t, cond = (a.double() for a in inputs(cfg, b=2, seed=5))
    v = net(z_t, t, cond)
    # (LayerNorm's eps = 1e-5 makes the invariance approximate: ~1e-6 here, against O(0.1) without the norm)
    for scale, offset in ((10.0, 0.0), (100.0, 0.0), (1.0, 3.0), (10.0, -2.0)):
        assert (net(z_t, t, scale * cond + offset) - v).abs().max() < 1e-4, (scale, offset)
    other = cond.clone()
    other[0] = torch.roll(other[0], 1)
    assert (net(z_t, t, other)[0] - v[0]).abs().max() > 1e-4
    # additive with the time embedding: moving a constant from the projection's bias into the time MLP's
    # output bias leaves every prediction unchanged
    delta = torch.randn(net.cond_embed[1].bias.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with torch.no_grad():
        net.cond_embed[1].bias += delta
        net.time_embed[2].bias -= delta
    assert torch.allclose(net(z_t, t, cond), v, atol=1e-10)
    with torch.no_grad():
        net.time_embed[2].bias += delta                  # now only the condition moved: the output does too
    assert (net(z_t, t, cond) - v).abs().max() > 1e-4


def test_timestep_conditioning_scalar_t_and_per_example_t():
    net = randomize(uvit.UViT(MICRO), seed=4).double().eval()
    z_t, _, cond = (a.double() for a in inputs(MICRO, b=3, seed=6))
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    v = net(z_t, t, cond)
    for b in range(3):  # a scalar t is broadcast to every example
        assert torch.allclose(net(z_t, t[b], cond)[b], v[b], atol=1e-10)
    assert (net(z_t, torch.full_like(t, 0.2), cond)[1:] - v[1:]).abs().max() > 1e-4


def test_every_residual_branch_starts_as_the_identity():
    # Google UNet lineage (ddpm_w_distillation unet3.py): the last layer of every residual branch is zero-initialised.
    torch.manual_seed(0)
    net = uvit.UViT(dataclasses.replace(REF, channels=(16, 32), blocks=(1, 1)))
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(2, 4 * 16, generator=g)
    for blk in net.mid_transformer:
        x, ctx = torch.randn(2, 16, 32, generator=g), torch.randn(2, 3, 32, generator=g)
        assert torch.equal(blk(x, emb, ctx), x)
    for level in (*net.down_levels, *net.up_levels):
        for blk in level:
            if isinstance(blk, uvit.TransformerBlock):
                x = torch.randn(2, 4, 32, generator=g)
                assert torch.equal(blk(x, emb), x)
            else:
                x = torch.randn(2, blk.norm1.num_channels, 4, 4, generator=g)
                assert torch.allclose(blk(x, emb), blk.shortcut(x), atol=0)


def test_dropout_only_in_the_transformer_mlps():
    # simple diffusion: dropout "not on the highest resolution feature maps"; uvit.py puts it in the
    # transformer MLPs only (lucidrains' reading): the conv levels are deterministic in train mode.
    cfg = dataclasses.replace(REF, dropout=0.5)
    net = randomize(uvit.UViT(cfg), seed=5)
    drops = [m for m in net.modules() if isinstance(m, torch.nn.Dropout)]
    owners = [m.dropout for m in net.modules() if isinstance(m, uvit.TransformerBlock)]
    assert len(drops) == len(owners) == 4 and {id(m) for m in drops} == {id(m) for m in owners}
    assert all(m.p == 0.5 for m in drops)
    z_t, t, cond = inputs(cfg)
    net.train()
    assert not torch.allclose(net(z_t, t, cond), net(z_t, t, cond))       # stochastic in training
    net.eval()
    assert torch.equal(net(z_t, t, cond), net(z_t, t, cond))               # deterministic at sampling
    blk = randomize(uvit.TransformerBlock(32, 16, 2, 8, 0.5, cross=False), seed=6).train()
    x, emb = torch.randn(2, 4, 32), torch.randn(2, 8)
    torch.manual_seed(0)
    a = blk(x, emb)
    torch.manual_seed(0)
    h = torch.nn.functional.gelu(blk.fc1(blk.norm3(x + blk.attn(blk.norm1(x)))))
    scale, shift = blk.film(emb)[:, None].chunk(2, dim=-1)
    want = x + blk.attn(blk.norm1(x)) + blk.fc2(torch.nn.functional.dropout(h * (1 + scale) + shift, 0.5))
    assert torch.allclose(a, want, atol=1e-5)                                # dropout on the FiLM'd hidden layer
