"""Frozen image encoders for Semantica: DINOv2 and SigLIP vision transformers, from scratch.

Semantica conditions its denoiser on the tokens of a frozen, pre-trained image encoder and filters
training pairs with the cosine similarity of its global embedding (Semantica §3.2, §5, §6.2, App. D;
arXiv:2405.14857). §6.2 compares DINOv2 and SigLIP at B and L size; DINOv2 wins and is the default.

    encoder = load_encoder("dinov2-b14", "dinov2_vitb14_pretrain.pth")   # or from_checkpoint(path)
    g, tokens = encoder(encoder.preprocess(images))                       # images in [-1, 1]

- DINOv2 (facebookresearch/dinov2 @ b8931f7, dinov2/models/vision_transformer.py): patch 14,
  LayerNorm eps 1e-6, exact GELU MLP (g/14: SwiGLU), LayerScale, table of 1+37x37 positions,
  optional 4 registers inserted after the position embedding. Input normalised with the ImageNet
  mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225). Output: global = final-normed CLS (B, D);
  tokens = final-normed sequence [CLS, registers, patches] (B, 1+R+N, D), patches last in raster order.
  Eval preprocessing: Resize(256, bicubic) + CenterCrop(224) (dinov2/data/transforms.py).
- SigLIP (google-research/big_vision @ 0127fb6, models/vit.py, pool_type='map'): patch 16, no CLS,
  learned table, tanh GELU, eps 1e-6, post-LayerNorm, MAP head. Input normalised with mean = std = 0.5
  (so [-1, 1] passes unchanged). Output: global = MAP head output (B, D); tokens = post-LayerNorm patch
  tokens (B, N, D). Eval preprocessing: squash-resize to the native size (HF SiglipImageProcessor).

Checkpoints are read from a local path only: the official DINOv2 `.pth` (a flat state dict with the
facebookresearch key names, which this module's DINOv2 `state_dict()` reproduces) and the Hugging
Face `google/siglip-*` folder (config.json + model.safetensors; text tower ignored).
Left out: big_vision `.npz` files, HF-format DINOv2 files, MAE/CLIP, SigLIP at non-native sizes.
"""
import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # dinov2/data/transforms.py
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)                  # HF SiglipImageProcessor


@dataclass(frozen=True)
class EncoderConfig:
    family: str             # "dinov2" | "siglip"
    dim: int                # width D
    depth: int
    heads: int              # D / 64 for every released model
    patch_size: int
    image_size: int         # eval resolution that `preprocess` produces
    pos_grid: int           # side of the stored position table (DINOv2: 37 = 518 / 14)
    mlp_hidden: int
    registers: int = 0      # DINOv2 *_reg4 models: 4
    swiglu: bool = False    # DINOv2 g/14 only
    crop_ratio: float = 224 / 256  # DINOv2 Resize(256) + CenterCrop(224); SigLIP does not crop


def _dino(d, depth, heads, hidden, swiglu=False):    # dinov2/hub/backbones.py, encoders.md §1.1
    return EncoderConfig("dinov2", d, depth, heads, 14, 224, 37, hidden, swiglu=swiglu)


def _siglip(d, depth, heads, hidden, res):              # big_vision vit.decode_variant, B and L
    return EncoderConfig("siglip", d, depth, heads, 16, res, res // 16, hidden, crop_ratio=1.0)


_DINOV2 = {"s": _dino(384, 12, 6, 1536), "b": _dino(768, 12, 12, 3072), "l": _dino(1024, 24, 16, 4096),
           "g": _dino(1536, 40, 24, 4096, swiglu=True)}   # g: SwiGLU hidden (int(4D*2/3)+7)//8*8 = 4096
ENCODER_PRESETS = {
    **{f"dinov2-{s}14": c for s, c in _DINOV2.items()},
    **{f"dinov2-{s}14-reg": replace(c, registers=4) for s, c in _DINOV2.items()},
    **{f"siglip-b16-{r}": _siglip(768, 12, 12, 3072, r) for r in (224, 256, 384, 512)},
    **{f"siglip-l16-{r}": _siglip(1024, 24, 16, 4096, r) for r in (256, 384)},
    # DESIGN: a DINOv2-architecture ViT small enough for CPU tests and the default 32x32 job; its
    # table is stored at the eval grid (8x8) and it does not crop (synthetic pages are pre-framed).
    "tiny": EncoderConfig("dinov2", 128, 4, 2, 4, 32, 8, 512, crop_ratio=1.0),
}


def interpolate_pos_embed(table, gh, gw, antialias, offset):
    """Resize a square (1, M*M, D) position table to a (gh, gw) grid exactly as official DINOv2 does.

    Non-register models: bicubic with scale factor (g + 0.1) / M and no antialias (offset=0.1, a kludge
    kept from dino issue #8; F.interpolate uses the given factor, so this differs from size=).
    Register models: bicubic to size=(gh, gw) with antialias (offset=0). Always computed in float32.
    """
    M = math.isqrt(table.shape[1])
    if gh == gw == M:                        # official shortcut: same patch count and square input
        return table
    grid = rearrange(table.float(), "1 (h w) d -> 1 d h w", h=M)
    if offset:
        size = dict(scale_factor=((gh + offset) / M, (gw + offset) / M))
    else:
        size = dict(size=(gh, gw))
    grid = F.interpolate(grid, mode="bicubic", align_corners=False, antialias=antialias, **size)
    assert grid.shape[-2:] == (gh, gw), (grid.shape, gh, gw)
    return rearrange(grid, "1 d h w -> 1 (h w) d").to(table.dtype)


class Attention(nn.Module):
    """Multi-head attention; qkv weight rows stacked [q; k; v] (official DINOv2 and nn.MultiheadAttention)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context=None):
        if context is None:                               # self-attention
            q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        else:                                             # MAP head: x = probe queries, context = tokens
            D = x.shape[-1]
            q = F.linear(x, self.qkv.weight[:D], self.qkv.bias[:D])
            kv = F.linear(context, self.qkv.weight[D:], self.qkv.bias[D:])
            q = rearrange(q, "b n (h d) -> b h n d", h=self.heads)
            k, v = rearrange(kv, "b n (two h d) -> two b h n d", two=2, h=self.heads)
        x = F.scaled_dot_product_attention(q, k, v)       # softmax(q k^T / sqrt(d)) v
        return self.proj(rearrange(x, "b h n d -> b n (h d)"))


class Mlp(nn.Module):
    def __init__(self, dim, hidden, approximate):         # DINOv2: exact GELU; SigLIP: Flax nn.gelu = tanh
        super().__init__()
        self.fc1, self.fc2, self.approximate = nn.Linear(dim, hidden), nn.Linear(hidden, dim), approximate

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class SwiGLU(nn.Module):
    """dinov2/layers/swiglu_ffn.py: w12 = [gate; up], silu(gate) * up, then w3."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))        # hub init_values=1.0; trained values are loaded

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x))."""

    def __init__(self, c):
        super().__init__()
        dino = c.family == "dinov2"
        self.norm1 = nn.LayerNorm(c.dim, eps=1e-6)
        self.attn = Attention(c.dim, c.heads)
        self.ls1 = LayerScale(c.dim) if dino else nn.Identity()
        self.norm2 = nn.LayerNorm(c.dim, eps=1e-6)
        self.mlp = SwiGLU(c.dim, c.mlp_hidden) if c.swiglu else Mlp(c.dim, c.mlp_hidden, "none" if dino else "tanh")
        self.ls2 = LayerScale(c.dim) if dino else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class MAPHead(nn.Module):
    """big_vision MAPHead: a learned probe attends over the tokens, then x + MLP(LN(x)); output x[:, 0]."""

    def __init__(self, c):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.attn = Attention(c.dim, c.heads)
        self.norm = nn.LayerNorm(c.dim, eps=1e-6)
        self.mlp = Mlp(c.dim, c.mlp_hidden, "tanh")

    def forward(self, tokens):
        x = self.attn(self.probe.expand(tokens.shape[0], -1, -1), context=tokens)
        return (x + self.mlp(self.norm(x)))[:, 0]


class VisionEncoder(nn.Module):
    """A frozen DINOv2 or SigLIP ViT: images in [-1, 1] -> (global (B, D), tokens (B, T, D))."""

    def __init__(self, config, name="custom"):
        super().__init__()
        c = self.config = config
        self.name, self.family, self.dim, self.weights = name, c.family, c.dim, None
        self.image_size, self.patch_size = c.image_size, c.patch_size
        dino = c.family == "dinov2"
        self.num_tokens = (1 + c.registers if dino else 0) + (c.image_size // c.patch_size) ** 2
        self.mean, self.std = (IMAGENET_MEAN, IMAGENET_STD) if dino else (SIGLIP_MEAN, SIGLIP_STD)
        # Attribute names are the official DINOv2 checkpoint keys (encoders.md §1.3).
        if dino:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
            self.mask_token = nn.Parameter(torch.zeros(1, c.dim))   # iBOT training only: loaded, unused
            if c.registers:
                self.register_tokens = nn.Parameter(torch.zeros(1, c.registers, c.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, int(dino) + c.pos_grid ** 2, c.dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, c.dim, c.patch_size, c.patch_size)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim, eps=1e-6)
        if not dino:
            self.head = MAPHead(c)

    def positions(self, gh, gw):
        """Position table for a (gh, gw) patch grid (encoders.md §1.4); SigLIP only at its native grid."""
        if self.family == "siglip":
            if (gh, gw) != (self.config.pos_grid,) * 2:
                raise ValueError(f"{self.name}: SigLIP runs only at its native {self.image_size}px "
                                 f"({self.config.pos_grid}x{self.config.pos_grid} patches), got {gh}x{gw} patches")
            return self.pos_embed
        reg = self.config.registers > 0      # *_reg4 hub models: antialias, no offset; others: offset 0.1
        grid = interpolate_pos_embed(self.pos_embed[:, 1:], gh, gw, antialias=reg, offset=0.0 if reg else 0.1)
        return torch.cat([self.pos_embed[:, :1], grid], dim=1)

    @torch.no_grad()
    def forward(self, images):
        """Frozen use (Semantica §3.2): `encode` without autograd."""
        return self.encode(images)

    def encode(self, images):
        """[-1, 1] images (B, 3, H, W) -> (global (B, D), tokens (B, T, D)), float32; with autograd,
        for the rare caller that trains an encoder (experiments/features.py)."""
        B, _, H, W = images.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"{self.name}: image size {H}x{W} is not a multiple of the patch size {p}")
        mean, std = (images.new_tensor(m).view(1, 3, 1, 1) for m in (self.mean, self.std))
        x = ((images + 1) / 2 - mean) / std                       # [-1, 1] -> the encoder's own normalisation
        x = rearrange(self.patch_embed.proj(x), "b d h w -> b (h w) d")
        if self.family == "dinov2":
            x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)
        x = x + self.positions(H // p, W // p).to(x.dtype)
        if self.config.registers:                                 # registers carry no position embedding
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1).to(x.dtype), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        g = x[:, 0] if self.family == "dinov2" else self.head(x)
        return g.float(), x.float()     # DESIGN: float32 out, also under bf16 autocast

    def preprocess(self, images):
        """Official eval preprocessing on [-1, 1] tensors -> (B, 3, image_size, image_size) in [-1, 1]."""
        s, (h, w) = self.image_size, images.shape[-2:]
        if self.family == "siglip":                                # squash-resize, no crop
            return _resize(images, (s, s))
        short = round(s / self.config.crop_ratio)                  # 224 -> Resize(256)
        size = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)  # torchvision rounding
        x = _resize(images, size)
        top, left = int(round((size[0] - s) / 2)), int(round((size[1] - s) / 2))    # CenterCrop(s)
        return x[..., top:top + s, left:left + s]


def _resize(images, size):
    # INTERPRETATION: PIL bicubic on uint8 images ~ antialiased bicubic on float tensors.
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)


def _random_init(enc, seed):
    """Deterministic random weights (independent of the global RNG), so a weight-less preset such as
    "tiny" is the same network every time it is rebuilt from its name."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(enc.named_parameters()):
        if name.endswith(("gamma", "norm1.weight", "norm2.weight", "norm.weight")):
            nn.init.ones_(p)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        else:                                                      # DINOv2 init_weights: trunc_normal(.02)
            p.data.copy_(torch.randn(p.shape, generator=g).clamp_(-2, 2) * 0.02)
    return enc


def _build(config, name):
    """Allocate without running the default initialisers (fast for g/14; the caller's RNG is untouched);
    every parameter is then filled by _random_init or a strict load."""
    with torch.device("meta"):
        enc = VisionEncoder(config, name)
    return enc.to_empty(device="cpu")


def _freeze(enc):
    return enc.eval().requires_grad_(False)


# ---------------------------------------------------------------- checkpoint files
_SIGLIP_HF = [  # HF SiglipVisionModel names (encoders.md §2.2) -> our DINOv2-style names
    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^embeddings\.position_embedding\.weight$", "pos_embed"),
    (r"^encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.", r"blocks.\1.attn.\2."),   # concatenated below
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"^post_layernorm\.", "norm."),
    (r"^head\.attention\.in_proj_(weight|bias)$", r"head.attn.qkv.\1"),         # rows already [q; k; v]
    (r"^head\.attention\.out_proj\.", "head.attn.proj."),
    (r"^head\.layernorm\.", "head.norm."),
]


def _from_hf_siglip(sd):
    """Rename the vision tower of an HF SigLIP state dict; concatenate q, k, v into qkv; drop the text tower."""
    if any(k.startswith("vision_model.") for k in sd):
        sd = {k[len("vision_model."):]: v for k, v in sd.items() if k.startswith("vision_model.")}
    out = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):                             # old non-persistent buffer
            continue
        for pattern, repl in _SIGLIP_HF:
            k = re.sub(pattern, repl, k)
        out[k] = v[None] if k == "pos_embed" else v                # nn.Embedding (N, D) -> (1, N, D)
    for k in [k for k in out if re.fullmatch(r"blocks\.\d+\.attn\.q\.(weight|bias)", k)]:
        pre, kind = k.rsplit(".q.", 1)
        out[f"{pre}.qkv.{kind}"] = torch.cat([out.pop(f"{pre}.{c}.{kind}") for c in "qkv"])
    return out


def _read(path):
    """Return (state dict in our names, heads from config.json or None, the file read)."""
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: checkpoint file not found")
    try:
        if file.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError as e:
                raise ImportError(f"{file}: reading .safetensors needs the optional extra: "
                                  "pip install safetensors") from e
            sd = load_file(str(file))
        else:
            sd = torch.load(file, map_location="cpu", weights_only=True)
    except ImportError:
        raise
    except Exception as e:
        raise ValueError(f"{file}: cannot read checkpoint (corrupt or truncated?): {type(e).__name__}: {e}") from e
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{file}: expected a flat state dict of tensors (the official backbone file)")
    sd = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}  # chunked blocks.c.N
    if any(k.startswith(("vision_model.", "embeddings.patch_embedding")) for k in sd):
        sd = _from_hf_siglip(sd)
    heads, cfg = None, file.parent / "config.json"
    if file.suffix == ".safetensors" and cfg.is_file():
        c = json.loads(cfg.read_text())
        heads = c.get("vision_config", c).get("num_attention_heads")
    return sd, heads, file


def _infer_config(sd, heads, file):
    """Architecture from tensor shapes (+ heads from config.json, else D / 64)."""
    need = [k for k in ("pos_embed", "patch_embed.proj.weight", "norm.weight", "blocks.0.norm1.weight") if k not in sd]
    if need:
        raise ValueError(f"{file}: not a DINOv2 or SigLIP vision checkpoint: missing keys {need}")
    D, _, p, _ = sd["patch_embed.proj.weight"].shape
    siglip = "head.probe" in sd
    n = sd["pos_embed"].shape[1] - (0 if siglip else 1)
    grid = math.isqrt(n)
    if grid * grid != n:
        raise ValueError(f"{file}: position table of {n} entries is not a square grid")
    heads = heads or D // 64
    if heads < 1 or D % heads:
        raise ValueError(f"{file}: cannot infer the head count for width {D}; pass heads=")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    swiglu = "blocks.0.mlp.w12.weight" in sd
    hidden = sd["blocks.0.mlp.w3.weight"].shape[1] if swiglu else sd["blocks.0.mlp.fc1.weight"].shape[0]
    if siglip:
        return EncoderConfig("siglip", D, depth, heads, p, grid * p, grid, hidden, crop_ratio=1.0)
    official = p == 14 and grid == 37                              # 518px table, evaluated at 224
    reg = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    return EncoderConfig("dinov2", D, depth, heads, p, 224 if official else grid * p, grid, hidden, reg, swiglu,
                         224 / 256 if official else 1.0)


def _load_state(enc, sd, file):
    """Strict load; on any mismatch raise an error naming the file, missing/unexpected keys and shapes."""
    own = enc.state_dict()
    missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs {enc.name} {tuple(own[k].shape)}"
              for k in sorted(own.keys() & sd.keys()) if sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        lists = {"missing keys": missing, "unexpected keys": unexpected, "shape mismatches": shapes}
        msg = "; ".join(f"{t} ({len(v)}): {v[:8]}" for t, v in lists.items() if v)
        raise ValueError(f"{file}: checkpoint does not match {enc.name}: {msg}")
    enc.load_state_dict(sd, strict=True)
    return enc


def from_checkpoint(path, heads=None):
    """Build the encoder that an official file describes (DINOv2 .pth, SigLIP HF folder/.safetensors)."""
    sd, cfg_heads, file = _read(path)
    config = _infer_config(sd, heads or cfg_heads, file)
    name = next((n for n, c in ENCODER_PRESETS.items() if c == config), f"{config.family}-custom")
    enc = _load_state(_build(config, name), sd, file)
    enc.weights = str(path)                  # identifier to store next to the name in checkpoints
    return _freeze(enc)


def load_encoder(name, weights=None, seed=0):
    """Preset by name; with `weights` the file must match it exactly, without them the weights are random
    (deterministic in `seed`). An unknown name with `weights` falls back to from_checkpoint."""
    if name not in ENCODER_PRESETS:
        if weights is not None:
            return from_checkpoint(weights)
        raise KeyError(f"unknown encoder {name!r}; presets: {sorted(ENCODER_PRESETS)}")
    enc = _random_init(_build(ENCODER_PRESETS[name], name), seed)
    if weights is not None:
        sd, _, file = _read(weights)
        _load_state(enc, sd, file)
    enc.weights = None if weights is None else str(weights)
    return _freeze(enc)


def save_dinov2(encoder, path):
    """Write a DINOv2-architecture encoder as an official-format backbone .pth (flat state dict)."""
    if encoder.family != "dinov2":
        raise ValueError(f"{encoder.name}: only DINOv2 encoders have an official .pth layout")
    torch.save({k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}, path)
