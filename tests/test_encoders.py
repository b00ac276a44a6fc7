"""encoders.py: official file layouts load strictly, outputs match an independent implementation
(HF transformers and OpenAI's clip/model.py, goldens made by scripts/make_encoder_goldens.py), both
DINOv2 interpolation rules, official preprocessing, frozen/bf16 use and clear errors. No transformers
and no downloads needed."""
import dataclasses
import json
import shutil
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import encoders as E

DATA = Path(__file__).parent / "data" / "encoders"
GOLDEN = torch.load(DATA / "golden.pt")
FILES = {"dinov2": DATA / "dinov2.pth", "dinov2_swiglu": DATA / "dinov2_swiglu.pth",
         "dinov2_reg": DATA / "dinov2_reg.pth", "siglip": DATA / "siglip", "clip_hf": DATA / "clip",
         "clip_openai": DATA / "clip_openai.pt", "mae": DATA / "mae.pth"}
HEADS = {"mae": 2}   # the MAE file does not record heads; the tiny golden has 2 at width 64 (not 64 / 64)


@pytest.mark.parametrize("case,size", [("dinov2", "native"), ("dinov2", "interp"), ("dinov2_swiglu", "native"),
                                       ("dinov2_swiglu", "interp"), ("dinov2_reg", "native"),
                                       ("dinov2_reg", "interp"), ("siglip", "native"), ("clip_hf", "native"),
                                       ("clip_hf", "interp"), ("clip_openai", "native"), ("mae", "native"),
                                       ("mae", "interp")])
def test_matches_golden_outputs(case, size):
    """Official-layout tiny files load strictly and reproduce the independent outputs: HF (DINOv2 with the
    official interpolation rule, SigLIP, CLIPVisionModelWithProjection, ViTMAEModel unmasked) and OpenAI's
    clip/model.py for the TorchScript .pt."""
    enc = E.from_checkpoint(FILES[case], heads=HEADS.get(case))
    gold = GOLDEN[case]
    g, tokens = enc(gold[f"images_{size}"])
    B, _, H, W = gold[f"images_{size}"].shape
    n_patch = (H // enc.patch_size) * (W // enc.patch_size)
    prefix = 0 if case == "siglip" else 1 + enc.config.registers
    assert g.shape == (B, enc.embed_dim) and tokens.shape == (B, prefix + n_patch, enc.dim)
    torch.testing.assert_close(g, gold[f"global_{size}"], atol=1e-4, rtol=0)
    torch.testing.assert_close(tokens, gold[f"tokens_{size}"], atol=1e-4, rtol=0)
    if case.startswith("clip"):                                 # CLIP global = ln_post(CLS) @ proj, E != D
        assert enc.embed_dim == 48 != enc.dim and torch.allclose(g, tokens[:, 0] @ enc.proj, atol=1e-6)
    elif case != "siglip":
        assert torch.equal(g, tokens[:, 0])                     # DINOv2/MAE global = final-normed CLS


def test_siglip_file_path_config_heads_and_text_tower():
    """The .safetensors file alone works (config.json beside it gives heads=4 != D/64); text tower ignored."""
    from safetensors import safe_open
    with safe_open(str(DATA / "siglip" / "model.safetensors"), "pt") as f:
        assert any(k.startswith("text_model.") for k in f.keys()) and "logit_scale" in f.keys()
    enc = E.from_checkpoint(DATA / "siglip" / "model.safetensors")
    assert (enc.family, enc.config.heads, enc.image_size, enc.num_tokens) == ("siglip", 4, 16, 16)
    assert enc.num_patches == enc.num_tokens                  # SigLIP: no class token, all 16 tokens are patches
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
    act = E.ENCODER_PRESETS[name].act if name.startswith("clip") else None   # not recorded in CLIP's weights
    config = E._infer_config(sd, E._family(sd), None, None, name, act)
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
    assert enc.num_patches == enc.config.num_patches == 64  # 32 px / patch 4 = 8 x 8
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
        assert enc.encode(x)[1].dtype == torch.float32 and not torch.equal(enc.encode(x)[1], tokens)  # bf16 inside
    assert torch.equal(g16, g) and torch.equal(t16, tokens)   # the frozen forward runs outside autocast, float32


def test_encode_is_forward_with_autograd():
    """encode() (for training an encoder, pages/toy_encoder.py) equals the frozen forward()."""
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
    (tmp_path / "obj.pth").write_bytes(b"# a text file\n")
    with pytest.raises(ValueError, match="obj.pth: cannot read.*not a torch file of tensors") as e:
        E.from_checkpoint(tmp_path / "obj.pth")                         # one line, never torch's "weights_only=False"
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)
    assert E.load_failure(RuntimeError("zip broken\nmore")) == "RuntimeError: zip broken"   # first line only
    assert E.load_failure(OSError()) == "OSError: "                                         # no message: no IndexError
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
    with pytest.raises(ValueError, match="foo.pth: not a DINOv2, SigLIP, CLIP or MAE"):
        E.from_checkpoint(tmp_path / "foo.pth")
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        E.load_encoder("tiny")(torch.zeros(1, 3, 30, 32))
    with pytest.raises(KeyError, match="dinov2-b14"):
        E.load_encoder("dinov2-b16")                              # DINOv2 has no /16 model
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        E.from_checkpoint(DATA / "siglip")


def _meta(shapes):
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def _openai_visual(width, layers, patch, embed, res=224):
    """The `visual.*` names and shapes of an official CLIP ViT, written from clip/model.py
    (VisionTransformer, ResidualAttentionBlock with nn.MultiheadAttention and a 4x MLP)."""
    n = (res // patch) ** 2 + 1
    sd = {"visual.class_embedding": (width,), "visual.positional_embedding": (n, width),
          "visual.proj": (width, embed), "visual.conv1.weight": (width, 3, patch, patch),
          "visual.ln_pre.weight": (width,), "visual.ln_pre.bias": (width,),
          "visual.ln_post.weight": (width,), "visual.ln_post.bias": (width,)}
    for i in range(layers):
        b = f"visual.transformer.resblocks.{i}."
        sd.update({b + "ln_1.weight": (width,), b + "ln_1.bias": (width,), b + "ln_2.weight": (width,),
                   b + "ln_2.bias": (width,), b + "attn.in_proj_weight": (3 * width, width),
                   b + "attn.in_proj_bias": (3 * width,), b + "attn.out_proj.weight": (width, width),
                   b + "attn.out_proj.bias": (width,), b + "mlp.c_fc.weight": (4 * width, width),
                   b + "mlp.c_fc.bias": (4 * width,), b + "mlp.c_proj.weight": (width, 4 * width),
                   b + "mlp.c_proj.bias": (width,)})
    return sd


@pytest.mark.parametrize("name,width,layers,patch,embed", [("clip-b16", 768, 12, 16, 512),
                                                           ("clip-l14", 1024, 24, 14, 768)])
def test_clip_presets_match_the_official_openai_layout(name, width, layers, patch, embed):
    """The released ViT-B-16.pt / ViT-L-14.pt layout (clip/model.py build_model) maps onto the preset."""
    sd = E._rename({k[7:]: v for k, v in _meta(_openai_visual(width, layers, patch, embed)).items()}, E._OPENAI)
    config = E._infer_config(sd, E._family(sd), None, None, name, "quick_gelu")
    assert config == E.ENCODER_PRESETS[name] and config.heads == width // 64
    with torch.device("meta"):
        enc = E.VisionEncoder(config, name)
    assert {k: tuple(v.shape) for k, v in enc.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}
    assert enc.num_tokens == 1 + (224 // patch) ** 2 and enc.embed_dim == embed and enc.dim == width


def test_mae_preset_matches_the_official_layout():
    """mae_vit_large_patch16 (models_mae.py, timm names) with its decoder maps onto mae-l16; decoder dropped."""
    D = 1024
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, 197, D), "patch_embed.proj.weight": (D, 3, 16, 16),
              "patch_embed.proj.bias": (D,), "norm.weight": (D,), "norm.bias": (D,),
              "mask_token": (1, 1, 512), "decoder_embed.weight": (512, D), "decoder_pos_embed": (1, 197, 512)}
    for i in range(24):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (D,), b + "norm1.bias": (D,), b + "attn.qkv.weight": (3 * D, D),
                       b + "attn.qkv.bias": (3 * D,), b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                       b + "norm2.weight": (D,), b + "norm2.bias": (D,), b + "mlp.fc1.weight": (4 * D, D),
                       b + "mlp.fc1.bias": (4 * D,), b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,)})
    sd = _meta(shapes)
    assert E._family(sd) == "mae"
    sd = {k: v for k, v in sd.items() if not k.startswith(("decoder_", "mask_token"))}
    assert E._infer_config(sd, "mae", None, None, "x") == E.ENCODER_PRESETS["mae-l16"]
    with torch.device("meta"):
        enc = E.VisionEncoder(E.ENCODER_PRESETS["mae-l16"], "mae-l16")
    assert set(enc.state_dict()) == set(sd) and enc.num_tokens == 197 and enc.config.heads == 16


def test_clip_file_variants_load_the_same_network(tmp_path):
    """OpenCLIP flat state dict, its training-checkpoint wrapper, and the HF folder with pytorch_model.bin."""
    gold = GOLDEN["clip_openai"]
    with warnings.catch_warnings():                               # torch 2.13: "torch.jit.load is deprecated"
        warnings.simplefilter("ignore", DeprecationWarning)
        sd = torch.jit.load(str(DATA / "clip_openai.pt")).state_dict()
    assert any(k.startswith("transformer.resblocks.") for k in sd) and "text_projection" in sd  # text tower present
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    torch.save({"epoch": torch.tensor(3), "state_dict": {"module." + k: v for k, v in sd.items()}},
               tmp_path / "epoch_3.pt")
    for f in ("open_clip_pytorch_model.bin", "epoch_3.pt"):
        enc = E.from_checkpoint(tmp_path / f, act="quick_gelu")          # OpenAI weights: QuickGELU
        assert (enc.family, enc.config.heads, enc.config.norm_eps, enc.seed) == ("clip", 1, 1e-5, None)
        torch.testing.assert_close(enc(gold["images_native"])[0], gold["global_native"], atol=1e-4, rtol=0)
    from safetensors.torch import load_file
    folder = tmp_path / "hf"
    folder.mkdir()
    shutil.copy(DATA / "clip" / "config.json", folder)
    torch.save(load_file(str(DATA / "clip" / "model.safetensors")), folder / "pytorch_model.bin")
    enc = E.from_checkpoint(folder)
    assert enc.config.heads == 4 and enc.weights == str(folder)            # heads from config.json
    torch.testing.assert_close(enc(GOLDEN["clip_hf"]["images_interp"])[1], GOLDEN["clip_hf"]["tokens_interp"],
                               atol=1e-4, rtol=0)


def test_hf_clip_vision_model_without_projection(tmp_path):
    """A CLIPVisionModel file (no visual_projection) is still CLIP: global = ln_post(CLS), unprojected."""
    from safetensors.torch import load_file, save_file
    sd = {k: v for k, v in load_file(str(DATA / "clip" / "model.safetensors")).items() if k.startswith("vision_model.")}
    save_file(sd, str(tmp_path / "model.safetensors"))
    shutil.copy(DATA / "clip" / "config.json", tmp_path)
    enc = E.from_checkpoint(tmp_path)
    assert (enc.family, enc.embed_dim, enc.dim) == ("clip", 64, 64)
    g, tokens = enc(GOLDEN["clip_hf"]["images_native"])
    torch.testing.assert_close(tokens, GOLDEN["clip_hf"]["tokens_native"], atol=1e-4, rtol=0)
    assert torch.equal(g, tokens[:, 0])
    with pytest.raises(ValueError, match=r"missing keys \(1\): \['proj'\]"):
        E._load_state(E.VisionEncoder(replace(enc.config, embed_dim=48), "x"), enc.state_dict(), "f")


def test_mae_ignores_the_decoder(tmp_path):
    """The full pretraining model (mae_visualize_*.pth) carries the decoder: dropped, the encoder is unchanged."""
    ckpt = torch.load(DATA / "mae.pth")
    assert set(ckpt) == {"model"}
    ckpt["model"].update({"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.zeros(16, 64),
                          "decoder_pred.bias": torch.zeros(48)})
    torch.save(ckpt, tmp_path / "mae_visualize.pth")
    enc = E.from_checkpoint(tmp_path / "mae_visualize.pth", heads=2)
    assert enc.name == "mae-custom" and not hasattr(enc, "mask_token")
    torch.testing.assert_close(enc(GOLDEN["mae"]["images_native"])[1], GOLDEN["mae"]["tokens_native"], atol=1e-4,
                               rtol=0)


@pytest.mark.parametrize("name,weights,found", [
    ("clip-b16", "dinov2.pth", "found a DINOv2 checkpoint"),
    ("mae-l16", "clip", "found a CLIP image tower checkpoint"),
    ("dinov2-b14", "mae.pth", "found a MAE encoder checkpoint"),
    ("siglip-b16-224", "clip_openai.pt", "found a CLIP image tower checkpoint"),
    ("clip-l14", "siglip", "found a SigLIP checkpoint")])
def test_wrong_family_is_a_one_line_error(name, weights, found):
    with pytest.raises(ValueError, match=f"{name} expects .*{found}") as err:
        E.load_encoder(name, weights=DATA / weights)
    assert "\n" not in str(err.value) and E.OFFICIAL_FILES[name] in str(err.value)


def test_clip_config_json_must_agree_with_the_preset(tmp_path):
    """Exact-GELU OpenCLIP models look the same in the weights; config.json tells, and a preset refuses it."""
    folder = tmp_path / "laion"
    shutil.copytree(DATA / "clip", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vision_config"]["hidden_act"] = "gelu"
    (folder / "config.json").write_text(json.dumps(cfg))
    assert E.from_checkpoint(folder).config.act == "gelu"
    with pytest.raises(ValueError, match="activation gelu.*clip-b16 uses quick_gelu"):
        E.load_encoder("clip-b16", weights=folder)


def test_official_files_and_encoder_attributes():
    assert set(E.OFFICIAL_FILES) == set(E.ENCODER_PRESETS) - {"tiny"}
    assert "ViT-B-16.pt" in E.OFFICIAL_FILES["clip-b16"] and "openai/clip-vit-large-patch14" in E.OFFICIAL_FILES["clip-l14"]
    assert E.OFFICIAL_FILES["mae-l16"].startswith("mae_pretrain_vit_large.pth")
    assert E.OFFICIAL_FILES["dinov2-l14-reg"] == "dinov2_vitl14_reg4_pretrain.pth"
    enc = E.from_checkpoint(DATA / "mae.pth", heads=2)
    assert (enc.name, enc.weights, enc.seed, enc.dim, enc.embed_dim) == ("mae-custom", str(DATA / "mae.pth"), None, 64, 64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        enc.config.dim = 3
    tiny = E.load_encoder("tiny", seed=5)
    assert (tiny.seed, tiny.weights, tiny.dim) == (5, None, 128)
    assert E.EncoderConfig(**dataclasses.asdict(tiny.config)) == tiny.config


def test_clip_and_mae_preprocessing():
    """CLIP: Resize(224, bicubic) on the short side + CenterCrop(224); MAE: Resize(256) + CenterCrop(224)."""
    x = torch.rand(2, 3, 300, 400) * 2 - 1
    with torch.device("meta"):
        clip, mae = (E.VisionEncoder(E.ENCODER_PRESETS[n], n) for n in ("clip-b16", "mae-l16"))
    resized = F.interpolate(x, size=(224, 298), mode="bicubic", antialias=True).clamp(-1, 1)   # 400 * 224/300
    torch.testing.assert_close(clip.preprocess(x), resized[..., :, 37:261])
    resized = F.interpolate(x, size=(256, 341), mode="bicubic", antialias=True).clamp(-1, 1)
    torch.testing.assert_close(mae.preprocess(x), resized[..., 16:240, 58:282])
    assert clip.mean == E.CLIP_MEAN and mae.mean == E.IMAGENET_MEAN


@pytest.mark.slow
def test_random_mae_l16_for_app_e_training():
    """App. E: load_encoder("mae-l16", seed=...) is a deterministic random ViT-L usable without weights."""
    enc = E.load_encoder("mae-l16", seed=3)
    assert (enc.seed, enc.weights, enc.dim, enc.num_tokens) == (3, None, 1024, 197)
    assert sum(p.numel() for p in enc.parameters()) == 303_301_632    # ViT-L/16 encoder, mae_pretrain_vit_large
    x = torch.rand(1, 3, 32, 32) * 2 - 1                                  # 2x2 patches: interpolated table
    g, tokens = enc(x)
    assert g.shape == (1, 1024) and tokens.shape == (1, 5, 1024) and torch.isfinite(tokens).all()
    assert torch.equal(E.load_encoder("mae-l16", seed=3).pos_embed, enc.pos_embed)


def _openclip_reference(sd, x, act):
    """OpenCLIP's image tower written from open_clip transformer.py (VisionTransformer, ResidualAttentionBlock:
    nn.MultiheadAttention, MLP c_fc -> act -> c_proj, LayerNorm eps 1e-5) on `visual.*` tensors without the
    prefix; x in [-1, 1] -> (ln_post(CLS) @ proj, ln_post(tokens))."""
    sd = {k: v.float() for k, v in sd.items()}
    D, p = sd["conv1.weight"].shape[0], sd["conv1.weight"].shape[-1]
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (E.CLIP_MEAN, E.CLIP_STD))
    x = F.conv2d(((x + 1) / 2 - mean) / std, sd["conv1.weight"], stride=p).flatten(2).transpose(1, 2)
    x = torch.cat([sd["class_embedding"].expand(len(x), 1, D), x], dim=1) + sd["positional_embedding"]

    def ln(y, name):
        return F.layer_norm(y, (D,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-5)

    x = ln(x, "ln_pre")
    for i in range(1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))):
        b = f"transformer.resblocks.{i}."
        mha = torch.nn.MultiheadAttention(D, max(1, D // 64), batch_first=True)
        mha.load_state_dict({k[len(b) + 5:]: v for k, v in sd.items() if k.startswith(b + "attn.")})
        h = ln(x, b + "ln_1")
        x = x + mha(h, h, h, need_weights=False)[0]
        h = act(F.linear(ln(x, b + "ln_2"), sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"]))
        x = x + F.linear(h, sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"])
    x = ln(x, "ln_post")
    return x[:, 0] @ sd["proj"], x


def test_openclip_state_dict_needs_its_activation_stated(tmp_path):
    """A `visual.*` state dict does not record QuickGELU (OpenAI weights) vs nn.GELU (LAION/DataComp towers):
    refused in one line naming both, loaded as stated; a TorchScript archive and config.json record it."""
    gold = GOLDEN["clip_openai"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        sd = torch.jit.load(str(DATA / "clip_openai.pt")).state_dict()
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    for call in (lambda: E.from_checkpoint(tmp_path / "open_clip_pytorch_model.bin"),
                 lambda: E.load_encoder("clip-b16", weights=tmp_path / "open_clip_pytorch_model.bin")):
        with pytest.raises(ValueError, match=r"act= / --encoder-act: quick_gelu \(OpenAI weights.* or gelu \(") as e:
            call()
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="act must be one of"):
        E.from_checkpoint(tmp_path / "open_clip_pytorch_model.bin", act="relu")
    visual = {k[7:]: v for k, v in sd.items() if k.startswith("visual.")}
    x = gold["images_native"]
    ref_quick = _openclip_reference(visual, x, lambda h: h * torch.sigmoid(1.702 * h))
    torch.testing.assert_close(ref_quick[0], gold["global_native"], atol=1e-4, rtol=0)   # the reference is CLIP's
    ref_gelu = _openclip_reference(visual, x, torch.nn.GELU())
    assert (ref_gelu[0] - ref_quick[0]).abs().max() > 1e-2                               # the choice matters
    for act, (g_ref, t_ref) in (("quick_gelu", ref_quick), ("gelu", ref_gelu)):
        enc = E.from_checkpoint(tmp_path / "open_clip_pytorch_model.bin", act=act)
        assert (enc.config.act, enc.name) == (act, "clip-custom")
        g, tokens = enc(x)
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(tokens, t_ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="clip-b16 uses quick_gelu"):           # a GELU tower is not the preset
        E.load_encoder("clip-b16", weights=tmp_path / "open_clip_pytorch_model.bin", act="gelu")
    assert E.from_checkpoint(DATA / "clip_openai.pt").config.act == "quick_gelu"  # the archive's QuickGELU class
    with pytest.raises(ValueError, match="runs activation quick_gelu, not act='gelu'"):
        E.from_checkpoint(DATA / "clip_openai.pt", act="gelu")
    shutil.copy(DATA / "clip" / "model.safetensors", tmp_path / "model.safetensors")   # no config.json beside it
    with pytest.raises(ValueError, match="does not record its MLP activation"):
        E.from_checkpoint(tmp_path / "model.safetensors", heads=4)
    enc = E.from_checkpoint(tmp_path / "model.safetensors", heads=4, act="quick_gelu")
    torch.testing.assert_close(enc(GOLDEN["clip_hf"]["images_native"])[0], GOLDEN["clip_hf"]["global_native"],
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module.",
                                    "module.module."])
def test_wrapper_prefixes_in_any_order(prefix, tmp_path):
    """DDP ("module.") and torch.compile ("_orig_mod.") prefixes, in any order, on encoder files: the same
    network as the bare file (independent goldens), by the one rule Semantica checkpoints use too."""
    sd = torch.load(DATA / "dinov2.pth")
    torch.save({prefix + k: v for k, v in sd.items()}, tmp_path / "wrapped.pth")
    enc = E.from_checkpoint(tmp_path / "wrapped.pth")
    g, tokens = enc(GOLDEN["dinov2"]["images_native"])
    torch.testing.assert_close(tokens, GOLDEN["dinov2"]["tokens_native"], atol=1e-4, rtol=0)
    tiny = E.load_encoder("tiny")
    torch.save({prefix + k: v for k, v in tiny.state_dict().items()}, tmp_path / "tiny.pth")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(E.load_encoder("tiny", weights=tmp_path / "tiny.pth")(x)[1], tiny(x)[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        clip = torch.jit.load(str(DATA / "clip_openai.pt")).state_dict()
    torch.save({"state_dict": {prefix + k: v for k, v in clip.items()}}, tmp_path / "epoch_1.pt")
    g, _ = E.from_checkpoint(tmp_path / "epoch_1.pt", act="quick_gelu")(GOLDEN["clip_openai"]["images_native"])
    torch.testing.assert_close(g, GOLDEN["clip_openai"]["global_native"], atol=1e-4, rtol=0)
    assert E.strip_prefixes(prefix + "net.blocks.0.attn") == "net.blocks.0.attn"


def test_uint8_and_non_tensor_images_are_refused_in_one_line():
    """uint8 images would meet a uint8 mean/std (0) and give NaN features: refused, as PIL images are."""
    enc = E.load_encoder("tiny")
    for bad in (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1, 32, 32, 3), [1, 2]):
        for fn in (enc, enc.encode, enc.preprocess):
            with pytest.raises(ValueError, match=r"tiny: expects float images \(B, 3, H, W\)") as e:
                fn(bad)
            assert "\n" not in str(e.value)
