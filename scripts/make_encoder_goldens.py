"""Generate the golden encoder tests in tests/data/encoders/ from independent implementations.

Builds tiny random-weight Hugging Face `transformers` vision models (Dinov2Model, Dinov2Model with
the g/14-style SwiGLU FFN, Dinov2WithRegistersModel, SiglipModel, CLIPModel, ViTMAEModel) and a tiny
model of OpenAI's own CLIP code (the `openai-clip` package, clip/model.py), writes their weights in the
OFFICIAL file layouts that users download, and stores inputs and reference outputs that
tests/test_encoders.py compares with encoders.py (no transformers needed in CI):

- DINOv2: a flat state dict with the facebookresearch key names (encoders.md §1.3, §1.6), saved
  with torch.save as `<case>.pth`;
- SigLIP: the hub folder `siglip/` (config.json + model.safetensors, full SiglipModel with a tiny
  text tower that the loader must ignore);
- CLIP (HF): the hub folder `clip/` (full CLIPModel, tiny text tower; QuickGELU, eps 1e-5); outputs of
  CLIPVisionModelWithProjection loaded from that folder: global = image_embeds, tokens =
  post_layernorm(last_hidden_state) (encoders.py's INTERPRETATION), at 16x16 and, with HF's
  interpolate_pos_encoding=True (bicubic size=), at 24x20;
- CLIP (OpenAI): `clip_openai.pt`, a TorchScript archive of the official clip/model.py CLIP (vision +
  tiny text tower, `visual.*` keys), as the released ViT-B-16.pt; outputs of its encode_image and
  ln_post of its transformer output, at its native 16x16 only (the official code cannot interpolate);
  width 64 so that the official heads = width // 64 rule applies;
- MAE: `mae.pth` = {"model": encoder state dict with the facebookresearch/mae (timm) key names},
  converted from ViTMAEModel (width 64 with 2 heads: the file does not record heads, so the test
  passes heads=2; the released ViT-L/16 gets the timm default 1024 / 64 = 16); outputs of ViTMAEModel
  with mask_ratio=0 and noise = arange (argsort keeps the patch order, so nothing is masked or
  shuffled), at 16x16 and, interpolated (HF's bicubic size=), at 24x20.

Inputs: a native 16x16 batch (4x4 patch grid, no interpolation) and a non-square 24x20 batch (6x5
grid). HF's plain Dinov2Model resizes its table with size= (no +0.1 offset), which is NOT what the
official non-register models do (encoders.md §1.4), so for the non-register cases its resize is
replaced by the official rule below, copied from dinov2 @ e1277af. Dinov2WithRegistersModel already
matches the official register rule. SigLIP runs only at its native size.

To keep the files small (about 1.4 MB in all) the FFNs are narrowed to 32 units and the weights are rounded
to float16 before the reference forward and stored in float16; the loader casts them to the float32
parameters exactly. Reruns are reproducible up to float noise (<= 2e-6 in the outputs; weights bitwise).

Run once, in a throwaway environment (never inside the repo):
    python -m venv --system-site-packages /tmp/venv_tf && /tmp/venv_tf/bin/pip install transformers
    /tmp/venv_tf/bin/pip install --no-deps openai-clip                # clip/model.py only (no torchvision)
    /tmp/venv_tf/bin/python scripts/make_encoder_goldens.py      # transformers 5.24.0, openai-clip 1.0.1,
                                                                 # torch 2.13.0
"""
import importlib.util
import math
import re
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (CLIPConfig, CLIPModel, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model,
                          Dinov2WithRegistersConfig, Dinov2WithRegistersModel, SiglipConfig, SiglipModel,
                          ViTMAEConfig, ViTMAEModel)

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "encoders"
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
DINO = dict(hidden_size=128, num_attention_heads=2, num_hidden_layers=1, patch_size=4, image_size=16,
            layer_norm_eps=1e-6, hidden_act="gelu")   # patch_size set explicitly (HF default is 16)


def randomise(model, seed):
    """Every parameter random (LayerScale, LayerNorm affines, tables, probe), rounded to float16."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if re.search(r"(norm\d?|layernorm|layer_norm\d|lambda1|ln_\w+|layernorm_\w+)\.?(weight)?$", name) and p.ndim == 1:
            v = 1 + 0.3 * r                       # LayerNorm weight / LayerScale gamma
        elif name.endswith("bias") and p.ndim == 1:
            v = 0.3 * r
        elif any(t in name for t in ("token", "position", "probe")):
            v = r                                 # std-1 tables make a wrong interpolation obvious
        else:
            v = r / math.sqrt(p[0].numel() if p.ndim else 1)   # weights: 1/sqrt(fan_in)
        p.data.copy_(v.half().float())
    return model.eval()


def shrink_ffn(model, hidden=32):
    """Narrow every FFN to `hidden` units to keep the files small (HF configs only take an integer mlp_ratio)."""
    for layer in model.encoder.layer:
        mlp, D = layer.mlp, model.config.hidden_size
        for name, shape in {"fc1": (D, hidden), "fc2": (hidden, D), "gate_proj": (D, hidden), "up_proj": (D, hidden),
                            "down_proj": (hidden, D), "weights_in": (D, 2 * hidden), "weights_out": (hidden, D)}.items():
            if hasattr(mlp, name):
                setattr(mlp, name, torch.nn.Linear(*shape))
    return model


def official_interpolate(self, embeddings, height, width):
    """dinov2/models/vision_transformer.py::interpolate_pos_encoding (e1277af), offset 0.1, no antialias."""
    previous_dtype = embeddings.dtype
    npatch, N = embeddings.shape[1] - 1, self.position_embeddings.shape[1] - 1
    if npatch == N and width == height:
        return self.position_embeddings
    pos_embed = self.position_embeddings.float()
    class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
    dim, M = embeddings.shape[-1], int(math.sqrt(N))
    h0, w0 = height // self.patch_size, width // self.patch_size
    patch_pos_embed = F.interpolate(patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic",
                                    antialias=False, scale_factor=((h0 + 0.1) / M, (w0 + 0.1) / M))
    assert (h0, w0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)


def to_official(hf):
    """HF Dinov2 state dict (4.x hub names or 5.x runtime names) -> facebookresearch names (encoders.md §1.6)."""
    out = {}
    for k, v in hf.items():
        k = k.replace("embeddings.position_embeddings", "pos_embed").replace("embeddings.patch_embeddings.projection",
                                                                            "patch_embed.proj")
        k = re.sub(r"^embeddings\.", "", k)
        k = re.sub(r"^encoder\.layer\.", "blocks.", k).replace("layernorm.", "norm.")
        k = k.replace("layer_scale1.lambda1", "ls1.gamma").replace("layer_scale2.lambda1", "ls2.gamma")
        k = re.sub(r"attention\.(output\.dense|o_proj)\.", "attn.proj.", k)
        k = re.sub(r"mlp\.(weights_in)\.", "mlp.w12.", k)
        k = re.sub(r"mlp\.(weights_out|down_proj)\.", "mlp.w3.", k)
        m = re.match(r"(blocks\.\d+)\.(?:attention\.attention\.(query|key|value)|attention\.([qkv])_proj)\.(\w+)$", k)
        g = re.match(r"(blocks\.\d+)\.mlp\.(gate|up)_proj\.(\w+)$", k)
        if m:                                                  # rows stacked [q; k; v]
            k, i = m[1] + ".attn.qkv." + m[4], "qkv".index((m[2] or m[3])[0])
        elif g:                                                # w12 = [gate; up]
            k, i = g[1] + ".mlp.w12." + g[3], ("gate", "up").index(g[2])
        else:
            k, i = k, 0
        out.setdefault(k, {})[i] = v
    return {k: torch.cat([parts[i] for i in sorted(parts)]) for k, parts in out.items()}


def mae_to_official(hf):
    """HF ViTMAE encoder names (4.x hub or 5.x runtime) -> facebookresearch/mae (timm) names; qkv = [q; k; v]."""
    out = {}
    for k, v in hf.items():
        k = re.sub(r"^vit\.", "", k).replace("embeddings.position_embeddings", "pos_embed")
        k = k.replace("embeddings.patch_embeddings.projection", "patch_embed.proj").replace("embeddings.cls_token",
                                                                                           "cls_token")
        k = re.sub(r"^(encoder\.layer|layers)\.", "blocks.", k)
        k = re.sub(r"^layernorm\.", "norm.", k).replace("layernorm_before", "norm1").replace("layernorm_after", "norm2")
        k = re.sub(r"attention\.(output\.dense|o_proj)\.", "attn.proj.", k)
        k = re.sub(r"intermediate\.dense\.", "mlp.fc1.", k)
        k = re.sub(r"(blocks\.\d+)\.output\.dense\.", r"\1.mlp.fc2.", k)
        m = re.match(r"(blocks\.\d+)\.(?:attention\.attention\.(query|key|value)|attention\.([qkv])_proj)\.(\w+)$", k)
        k, i = (m[1] + ".attn.qkv." + m[4], "qkv".index((m[2] or m[3])[0])) if m else (k, 0)
        out.setdefault(k, {})[i] = v
    return {k: torch.cat([parts[i] for i in sorted(parts)]) for k, parts in out.items()}


def official_clip_module():
    """clip/model.py from the openai-clip package, imported alone (its __init__ needs torchvision)."""
    spec = importlib.util.find_spec("clip")
    path = Path(spec.submodule_search_locations[0]) / "model.py"
    module_spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def images(seed, h, w):
    return torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def dinov2_case(model, official_rule):
    if official_rule:                                          # encoders.md §1.4: HF Dinov2Model differs here
        model.embeddings.interpolate_pos_encoding = types.MethodType(official_interpolate, model.embeddings)
    res = {}
    for size, (h, w, seed) in {"native": (16, 16, 1), "interp": (24, 20, 2)}.items():
        x = images(seed, h, w)
        with torch.no_grad():
            o = model(pixel_values=((x + 1) / 2 - MEAN) / STD)
        res[f"images_{size}"], res[f"global_{size}"], res[f"tokens_{size}"] = x, o.pooler_output, o.last_hidden_state
    return res


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    golden = {}
    cases = {
        "dinov2": (Dinov2Model(Dinov2Config(**DINO, mlp_ratio=1)), True),
        "dinov2_swiglu": (Dinov2Model(Dinov2Config(**DINO, mlp_ratio=1, use_swiglu_ffn=True)), True),
        "dinov2_reg": (Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**DINO, mlp_ratio=1,
                                                                           num_register_tokens=4)), False),
    }
    for i, (name, (model, official_rule)) in enumerate(cases.items()):
        randomise(shrink_ffn(model), seed=i)
        torch.save({k: v.half() for k, v in to_official(model.state_dict()).items()}, OUT / f"{name}.pth")
        golden[name] = dinov2_case(model, official_rule)
    # the trap, recorded: HF's size= rule is not the official one for non-register models
    hf = dinov2_case(randomise(shrink_ffn(Dinov2Model(Dinov2Config(**DINO, mlp_ratio=1))), seed=0), official_rule=False)
    print("HF size= vs official offset rule, max |diff|:", (hf["tokens_interp"] - golden["dinov2"]["tokens_interp"]).abs().max().item())

    siglip = SiglipModel(SiglipConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         vocab_size=64, max_position_embeddings=8, bos_token_id=1, eos_token_id=2, pad_token_id=1),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           image_size=16, patch_size=4, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")))
    randomise(siglip, seed=7)
    siglip.half().save_pretrained(OUT / "siglip")              # float16 file, float32 reference forward
    siglip.float()
    x = images(3, 16, 16)
    with torch.no_grad():
        o = siglip.vision_model(pixel_values=x)                # SigLIP normalisation (mean = std = 0.5) is identity
    golden["siglip"] = {"images_native": x, "global_native": o.pooler_output, "tokens_native": o.last_hidden_state}
    golden.update(clip_cases(), mae=mae_case())
    torch.save({c: {k: v.contiguous() for k, v in d.items()} for c, d in golden.items()}, OUT / "golden.pt")
    for p in sorted(OUT.rglob("*")):
        print(p.relative_to(OUT), p.stat().st_size if p.is_file() else "")


def clip_cases():
    """HF CLIP folder + CLIPVisionModelWithProjection, and the OpenAI TorchScript .pt + official clip/model.py."""
    hf = CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         vocab_size=64, max_position_embeddings=8),
        vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
                           image_size=16, patch_size=4, layer_norm_eps=1e-5, hidden_act="quick_gelu",
                           projection_dim=48),                       # read by CLIPVisionModelWithProjection
        projection_dim=48))
    randomise(hf, seed=11)
    hf.half().save_pretrained(OUT / "clip")
    vision = CLIPVisionModelWithProjection.from_pretrained(OUT / "clip", dtype=torch.float32).eval()
    res = {}
    for size, (h, w, seed) in {"native": (16, 16, 4), "interp": (24, 20, 5)}.items():
        x = images(seed, h, w)
        with torch.no_grad():
            o = vision(pixel_values=((x + 1) / 2 - CLIP_MEAN) / CLIP_STD, interpolate_pos_encoding=size == "interp")
            tokens = vision.vision_model.post_layernorm(o.last_hidden_state)
        res[f"images_{size}"], res[f"global_{size}"], res[f"tokens_{size}"] = x, o.image_embeds, tokens
    cases = {"clip_hf": res}

    model_py = official_clip_module()
    oai = model_py.CLIP(embed_dim=48, image_resolution=16, vision_layers=2, vision_width=64, vision_patch_size=4,
                        context_length=4, vocab_size=16, transformer_width=32, transformer_heads=2,
                        transformer_layers=1)
    for block in oai.visual.transformer.resblocks:                 # narrow FFN (official: 4 * width)
        block.mlp.c_fc, block.mlp.c_proj = torch.nn.Linear(64, 32), torch.nn.Linear(32, 64)
    randomise(oai, seed=12).half().float()
    x = images(6, 16, 16)
    captured = []
    hook = oai.visual.transformer.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        g = oai.encode_image(((x + 1) / 2 - CLIP_MEAN) / CLIP_STD)
        tokens = oai.visual.ln_post(captured[-1].permute(1, 0, 2))   # LND -> NLD, then ln_post on every token
    hook.remove()
    model_py.convert_weights(oai)             # as the released .pt files: float16 except LayerNorms
    try:
        scripted = torch.jit.script(oai)
    except Exception as e:                                           # noqa: BLE001 - fall back to tracing
        print("torch.jit.script failed, tracing encode_image:", type(e).__name__, str(e)[:300])
        scripted = torch.jit.trace_module(oai, {"encode_image": x.half()})
    scripted.save(str(OUT / "clip_openai.pt"))
    cases["clip_openai"] = {"images_native": x, "global_native": g, "tokens_native": tokens}
    return cases


def mae_case():
    """ViTMAEModel with nothing masked or shuffled = the MAE encoder; saved as the release's {"model": ...}."""
    model = ViTMAEModel(ViTMAEConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                     image_size=16, patch_size=4, layer_norm_eps=1e-6, hidden_act="gelu",
                                     mask_ratio=0.0))
    randomise(model, seed=13)
    torch.save({"model": {k: v.half() for k, v in mae_to_official(model.state_dict()).items()}}, OUT / "mae.pth")
    res = {}
    for size, (h, w, seed) in {"native": (16, 16, 7), "interp": (24, 20, 8)}.items():
        x = images(seed, h, w)
        noise = torch.arange((h // 4) * (w // 4), dtype=torch.float32).expand(len(x), -1)  # argsort = identity
        with torch.no_grad():
            o = model(pixel_values=((x + 1) / 2 - MEAN) / STD, noise=noise, interpolate_pos_encoding=size == "interp")
        assert torch.equal(o.ids_restore[0], torch.arange(noise.shape[1])) and not o.mask.any()
        res[f"images_{size}"], res[f"global_{size}"], res[f"tokens_{size}"] = x, o.last_hidden_state[:, 0], \
            o.last_hidden_state
    return res


if __name__ == "__main__":
    main()
