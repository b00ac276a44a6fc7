"""encoders.py: official file layouts load strictly, outputs match an independent implementation
(HF transformers, goldens made by scripts/make_encoder_goldens.py), both DINOv2 interpolation rules,
official preprocessing, frozen/bf16 use and clear errors. No transformers and no downloads needed."""
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import encoders as E

DATA = Path(__file__).parent / "data" / "encoders"
GOLDEN = torch.load(DATA / "golden.pt")
FILES = {"dinov2": DATA / "dinov2.pth", "dinov2_swiglu": DATA / "dinov2_swiglu.pth",
         "dinov2_reg": DATA / "dinov2_reg.pth", "siglip": DATA / "siglip"}


@pytest.mark.parametrize("case,size", [("dinov2", "native"), ("dinov2", "interp"), ("dinov2_swiglu", "native"),
                                       ("dinov2_swiglu", "interp"), ("dinov2_reg", "native"),
                                       ("dinov2_reg", "interp"), ("siglip", "native")])
def test_matches_golden_outputs(case, size):
    """Official-layout tiny files load strictly and reproduce HF outputs (official interpolation rule)."""
    enc = E.from_checkpoint(FILES[case])
    gold = GOLDEN[case]
    g, tokens = enc(gold[f"images_{size}"])
    B, _, H, W = gold[f"images_{size}"].shape
    n_patch = (H // enc.patch_size) * (W // enc.patch_size)
    prefix = 0 if case == "siglip" else 1 + enc.config.registers
    assert g.shape == (B, enc.dim) and tokens.shape == (B, prefix + n_patch, enc.dim)
    torch.testing.assert_close(g, gold[f"global_{size}"], atol=1e-4, rtol=0)
    torch.testing.assert_close(tokens, gold[f"tokens_{size}"], atol=1e-4, rtol=0)
    if case != "siglip":
        assert torch.equal(g, tokens[:, 0])                     # DINOv2 global = final-normed CLS


def test_siglip_file_path_config_heads_and_text_tower():
    """The .safetensors file alone works (config.json beside it gives heads=4 != D/64); text tower ignored."""
    from safetensors import safe_open
    with safe_open(str(DATA / "siglip" / "model.safetensors"), "pt") as f:
        assert any(k.startswith("text_model.") for k in f.keys()) and "logit_scale" in f.keys()
    enc = E.from_checkpoint(DATA / "siglip" / "model.safetensors")
    assert (enc.family, enc.config.heads, enc.image_size, enc.num_tokens) == ("siglip", 4, 16, 16)
    g, _ = enc(GOLDEN["siglip"]["images_native"])
    torch.testing.assert_close(g, GOLDEN["siglip"]["global_native"], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="native"):             # SigLIP runs only at its native size
        enc(torch.zeros(1, 3, 20, 16))


def test_siglip_without_config_needs_heads(tmp_path):
    shutil.copy(DATA / "siglip" / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="heads"):              # D = 32 is not a multiple of 64
        E.from_checkpoint(tmp_path)
    assert E.from_checkpoint(tmp_path, heads=4).config.heads == 4


@pytest.mark.parametrize("name", sorted(E.ENCODER_PRESETS))
def test_presets_roundtrip_through_architecture_inference(name):
    """Every preset's state dict (official key names) is inferred back to the same architecture and name."""
    with torch.device("meta"):
        enc = E.VisionEncoder(E.ENCODER_PRESETS[name], name)
    sd = enc.state_dict()
    config = E._infer_config(sd, None, name)
    assert config == E.ENCODER_PRESETS[name]
    if config.family == "dinov2":
        assert sd["pos_embed"].shape[1] == 1 + config.pos_grid ** 2 and sd["mask_token"].shape == (1, config.dim)
        assert ("register_tokens" in sd) == name.endswith("-reg")
        assert f"blocks.{config.depth - 1}.ls2.gamma" in sd
    if name == "dinov2-g14":
        assert sd["blocks.39.mlp.w12.weight"].shape == (8192, 1536) and config.heads == 24


def test_tiny_save_load_official_format(tmp_path):
    """torch.save(state_dict) / save_dinov2 write a flat official-format file that from_checkpoint reads."""
    enc = E.load_encoder("tiny")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    g, tokens = enc(x)
    assert g.shape == (2, 128) and tokens.shape == (2, enc.num_tokens, 128) and enc.num_tokens == 1 + 64
    torch.save(enc.state_dict(), tmp_path / "a.pth")
    E.save_dinov2(enc, tmp_path / "b.pth")
    for p in ("a.pth", "b.pth"):
        back = E.from_checkpoint(tmp_path / p)
        assert back.name == "tiny" and back.weights == str(tmp_path / p) and torch.equal(back(x)[1], tokens)
    sd = torch.load(tmp_path / "b.pth")
    assert {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "blocks.3.attn.qkv.weight",
            "blocks.3.ls1.gamma", "norm.bias"} <= set(sd)
    chunked = {k.replace("blocks.", "blocks.0.", 1) if k.startswith("blocks.") else k: v for k, v in sd.items()}
    torch.save(chunked, tmp_path / "chunked.pth")               # block_chunks > 0 layout: blocks.<chunk>.<N>
    assert torch.equal(E.from_checkpoint(tmp_path / "chunked.pth")(x)[1], tokens)
    assert torch.equal(E.load_encoder("tiny", weights=tmp_path / "a.pth")(x)[1], tokens)


def test_random_init_is_deterministic_and_leaves_global_rng():
    state = torch.random.get_rng_state()
    a, b, c = E.load_encoder("tiny"), E.load_encoder("tiny"), E.load_encoder("tiny", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.pos_embed, c.pos_embed)


def _table(M=4, D=8, seed=0):
    return torch.randn(1, M * M, D, generator=torch.Generator().manual_seed(seed))


def test_interpolation_rules():
    """Non-register: bicubic, scale factor (g + 0.1) / M, no antialias; register: size=, antialias."""
    t = _table()
    assert E.interpolate_pos_embed(t, 4, 4, antialias=False, offset=0.1) is t      # official shortcut
    grid = t.view(1, 4, 4, 8).permute(0, 3, 1, 2)
    official = F.interpolate(grid, scale_factor=(6.1 / 4, 5.1 / 4), mode="bicubic", antialias=False)
    official = official.permute(0, 2, 3, 1).reshape(1, 30, 8)
    reg = F.interpolate(grid, size=(6, 5), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 30, 8)
    torch.testing.assert_close(E.interpolate_pos_embed(t, 6, 5, antialias=False, offset=0.1), official)
    torch.testing.assert_close(E.interpolate_pos_embed(t, 6, 5, antialias=True, offset=0.0), reg)
    size_rule = E.interpolate_pos_embed(t, 6, 5, antialias=False, offset=0.0)    # HF Dinov2Model's rule
    assert (size_rule - official).abs().max() > 0.05                            # the trap is real
    down = E.interpolate_pos_embed(_table(8), 3, 3, antialias=True, offset=0.0)  # antialias matters downscaling
    assert (down - E.interpolate_pos_embed(_table(8), 3, 3, antialias=False, offset=0.0)).abs().max() > 0.05
    half = E.interpolate_pos_embed(t.bfloat16(), 6, 5, antialias=False, offset=0.1)  # computed in float32
    full = E.interpolate_pos_embed(t.bfloat16().float(), 6, 5, antialias=False, offset=0.1)
    assert half.dtype == torch.bfloat16 and torch.equal(half, full.bfloat16())


@pytest.mark.parametrize("antialias,offset", [(False, 0.1), (True, 0.0)])
def test_interpolation_keeps_height_and_width_apart(antialias, offset):
    """A table that varies only down the rows still does so on a non-square (6, 5) grid: no h/w swap."""
    rows = torch.arange(4.0).repeat_interleave(4).view(1, 16, 1).expand(1, 16, 3)
    out = E.interpolate_pos_embed(rows, 6, 5, antialias=antialias, offset=offset).view(6, 5, 3)
    assert torch.allclose(out, out[:, :1]) and not torch.allclose(out, out[:1])


def test_variant_selects_rule():
    base = replace(E.ENCODER_PRESETS["tiny"], depth=1)
    plain, reg = E.VisionEncoder(base), E.VisionEncoder(replace(base, registers=4))
    reg.pos_embed.data.copy_(plain.pos_embed.data.normal_())
    assert not torch.allclose(plain.positions(6, 5), reg.positions(6, 5))
    torch.testing.assert_close(reg.positions(6, 5)[:, 1:],
                               E.interpolate_pos_embed(reg.pos_embed[:, 1:], 6, 5, antialias=True, offset=0.0))


def test_preprocess_matches_official_eval_transforms():
    x = torch.rand(2, 3, 300, 400) * 2 - 1
    with torch.device("meta"):
        dino, sig = E.VisionEncoder(E.ENCODER_PRESETS["dinov2-b14"]), E.VisionEncoder(E.ENCODER_PRESETS["siglip-b16-384"])
    resized = F.interpolate(x, size=(256, 341), mode="bicubic", antialias=True).clamp(-1, 1)  # Resize(256)
    torch.testing.assert_close(dino.preprocess(x), resized[..., 16:240, 58:282])            # CenterCrop(224)
    torch.testing.assert_close(sig.preprocess(x), F.interpolate(x, size=(384, 384), mode="bicubic",
                                                                antialias=True).clamp(-1, 1))  # squash
    tiny = E.load_encoder("tiny")
    assert tiny.preprocess(x).shape == (2, 3, 32, 32) and tiny.preprocess(x).abs().max() <= 1
    assert torch.equal(tiny.preprocess(x[..., :32, :32]), x[..., :32, :32])


def test_frozen_and_bf16_autocast():
    enc = E.load_encoder("tiny")
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    g, tokens = enc(x)
    assert not g.requires_grad and not tokens.requires_grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g16, t16 = enc(x)
    assert g16.dtype == t16.dtype == torch.float32 and torch.isfinite(t16).all()
    assert F.cosine_similarity(t16.flatten(1), tokens.flatten(1)).min() > 0.99


def test_encode_is_forward_with_autograd():
    """encode() (for training an encoder, experiments/features.py) equals the frozen forward()."""
    enc = E.load_encoder("tiny").requires_grad_(True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    g, tokens = enc.encode(x)
    g.sum().backward()
    assert enc.patch_embed.proj.weight.grad is not None
    assert torch.equal(g.detach(), enc(x)[0]) and torch.equal(tokens.detach(), enc(x)[1])


def test_errors_name_the_file_and_the_mismatch(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        E.from_checkpoint(tmp_path / "nope.pth")
    raw = (DATA / "dinov2.pth").read_bytes()
    (tmp_path / "trunc.pth").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="trunc.pth.*corrupt or truncated"):
        E.from_checkpoint(tmp_path / "trunc.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="junk.safetensors"):
        E.from_checkpoint(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match=r"dinov2.pth: checkpoint does not match tiny: .*missing keys \(42\).*"
                                         r"pos_embed: file \(1, 17, 128\) vs tiny \(1, 65, 128\)"):
        E.load_encoder("tiny", weights=DATA / "dinov2.pth")
    sd = torch.load(DATA / "dinov2_reg.pth")
    sd["extra.weight"] = sd.pop("blocks.0.ls1.gamma")
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad.pth.*missing keys \(1\): \['blocks.0.ls1.gamma'\].*"
                                         r"unexpected keys \(1\): \['extra.weight'\]"):
        E.from_checkpoint(tmp_path / "bad.pth")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "foo.pth")
    with pytest.raises(ValueError, match="foo.pth: not a DINOv2 or SigLIP"):
        E.from_checkpoint(tmp_path / "foo.pth")
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        E.load_encoder("tiny")(torch.zeros(1, 3, 30, 32))
    with pytest.raises(KeyError, match="dinov2-b14"):
        E.load_encoder("dinov2-b16")                              # DINOv2 has no /16 model
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        E.from_checkpoint(DATA / "siglip")
