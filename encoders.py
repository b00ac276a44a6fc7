"""Frozen image encoders for Semantica: DINOv2, SigLIP, CLIP and MAE vision transformers, from scratch.

Semantica conditions its denoiser on the tokens of a frozen, pre-trained image encoder and filters
training pairs with the cosine similarity of its global embedding (Semantica §3.2, §5, App. C;
arXiv:2405.14857). The filter thresholds are in App. C ("Data filtering"); §5 says App. D, which is
FiLM vs cross-attention. §6.2 compares DINOv2 and SigLIP at B and L size; DINOv2 wins and is the default.
App. E trains on a frozen MAE ViT-L; §8.2 and App. F measure alignment in CLIP B/16 and DINOv2 space.

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
- CLIP image tower (openai/CLIP @ 0845fc4, clip/model.py VisionTransformer): patch conv without bias,
  class token, learned table, `ln_pre` before the blocks, QuickGELU x*sigmoid(1.702x), LayerNorm eps
  1e-5, `ln_post`, projection (D, E). OpenCLIP's towers are the same network (open_clip transformer.py
  VisionTransformer) with the activation of its model config: QuickGELU for OpenAI's weights and the
  `-quickgelu` configs, exact GELU (nn.GELU) for the others, e.g. LAION and DataComp ViT-B-16.
  Input normalised with the CLIP mean (0.48145466, 0.4578275, 0.40821073) and std (0.26862954,
  0.26130258, 0.27577711). Output: global = ln_post(CLS) @ proj (B, E) (the CLIP image embedding,
  E = 512 for B/16, 768 for L/14); tokens = ln_post of the final sequence [CLS, patches] (B, 1+N, D),
  not projected. Eval preprocessing: Resize(224, bicubic) + CenterCrop(224).
- MAE encoder (facebookresearch/mae models_mae.py, encoder half, no masking): timm ViT with CLS, eps
  1e-6, exact GELU, no LayerScale, final norm. ImageNet mean/std. Output: global = final-normed CLS
  (B, D); tokens = the final-normed sequence [CLS, patches] (B, 1+N, D). Eval preprocessing as DINOv2
  (mae util/datasets.py: Resize(256, bicubic) + CenterCrop(224)).

Checkpoints are read from a local path only (OFFICIAL_FILES lists what each preset expects): the
official DINOv2 `.pth` (a flat state dict with the facebookresearch key names, which this module's
DINOv2 and MAE `state_dict()` reproduce), the Hugging Face `google/siglip-*` and `openai/clip-vit-*`
folders (config.json + model.safetensors or pytorch_model.bin; text tower ignored), the OpenAI CLIP
`.pt` (a TorchScript archive) or an OpenCLIP state dict (`visual.*` keys; text tower ignored), and the
MAE release `{"model": state_dict}` (decoder keys, if any, ignored). Key prefixes of wrapped or compiled
models ("module.", "_orig_mod.", in any order) are stripped (`strip_prefixes`, also semantica.py's rule).
A CLIP tower's activation is read from what the file records (config.json `hidden_act`, the class of a
TorchScript archive's MLP activation); an OpenCLIP `visual.*` state dict records none, so the caller states
it (`act="quick_gelu"` or `act="gelu"`) or the file is refused: the weights cannot tell.
Left out: big_vision `.npz` files, HF-format DINOv2/MAE files, SigLIP at non-native sizes.
"""
import json
import math
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # dinov2/data/transforms.py
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)                  # HF SiglipImageProcessor
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)                              # openai/CLIP clip/clip.py
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NORMALISATION = {"dinov2": (IMAGENET_MEAN, IMAGENET_STD), "siglip": (SIGLIP_MEAN, SIGLIP_STD),
                 "clip": (CLIP_MEAN, CLIP_STD), "mae": (IMAGENET_MEAN, IMAGENET_STD)}  # mae util/datasets.py


@dataclass(frozen=True)
class EncoderConfig:
    family: str             # "dinov2" | "siglip" | "clip" | "mae"
    dim: int                # width D
    depth: int
    heads: int              # D / 64 for every released model
    patch_size: int
    image_size: int         # eval resolution that `preprocess` produces
    pos_grid: int           # side of the stored position table (DINOv2: 37 = 518 / 14)
    mlp_hidden: int
    registers: int = 0      # DINOv2 *_reg4 models: 4
    swiglu: bool = False    # DINOv2 g/14 only
    crop_ratio: float = 224 / 256  # DINOv2/MAE Resize(256) + CenterCrop(224); CLIP 1.0; SigLIP does not crop
    act: str = "gelu"       # MLP: "gelu" (exact erf), "gelu_tanh" (SigLIP, Flax nn.gelu), "quick_gelu" (CLIP)
    norm_eps: float = 1e-6  # CLIP: 1e-5 (torch default in clip/model.py)
    embed_dim: int = 0      # CLIP: width E of the projected global embedding; 0 = no projection

    @property
    def num_patches(self):
        """Patch tokens at `image_size`: (image_size // patch_size) ** 2 (ViT patchify, non-overlapping)."""
        return (self.image_size // self.patch_size) ** 2


def _dino(d, depth, heads, hidden, swiglu=False):    # facebookresearch/dinov2 dinov2/hub/backbones.py
    return EncoderConfig("dinov2", d, depth, heads, 14, 224, 37, hidden, swiglu=swiglu)


def _siglip(d, depth, heads, hidden, res):              # big_vision vit.decode_variant, B and L
    return EncoderConfig("siglip", d, depth, heads, 16, res, res // 16, hidden, crop_ratio=1.0, act="gelu_tanh")


def _clip(d, depth, heads, patch, embed):               # clip/model.py build_model: heads = width // 64
    return EncoderConfig("clip", d, depth, heads, patch, 224, 224 // patch, 4 * d, crop_ratio=1.0,
                         act="quick_gelu", norm_eps=1e-5, embed_dim=embed)


_DINOV2 = {"s": _dino(384, 12, 6, 1536), "b": _dino(768, 12, 12, 3072), "l": _dino(1024, 24, 16, 4096),
           "g": _dino(1536, 40, 24, 4096, swiglu=True)}   # g: SwiGLU hidden (int(4D*2/3)+7)//8*8 = 4096
ENCODER_PRESETS = {
    **{f"dinov2-{s}14": c for s, c in _DINOV2.items()},
    **{f"dinov2-{s}14-reg": replace(c, registers=4) for s, c in _DINOV2.items()},
    **{f"siglip-b16-{r}": _siglip(768, 12, 12, 3072, r) for r in (224, 256, 384, 512)},
    **{f"siglip-l16-{r}": _siglip(1024, 24, 16, 4096, r) for r in (256, 384)},
    "clip-b16": _clip(768, 12, 12, 16, 512),              # OpenAI ViT-B/16 (§8.2, App. F alignment space)
    "clip-l14": _clip(1024, 24, 16, 14, 768),             # OpenAI ViT-L/14
    # App. E: models_mae.py mae_vit_large_patch16_dec512d8b, encoder half (mlp_ratio 4, eps 1e-6), eval at 224
    "mae-l16": EncoderConfig("mae", 1024, 24, 16, 16, 224, 14, 4096),
    # DESIGN: a DINOv2-architecture ViT small enough for CPU tests and the default 32x32 job; its
    # table is stored at the eval grid (8x8) and it does not crop (synthetic pages are pre-framed).
    "tiny": EncoderConfig("dinov2", 128, 4, 2, 4, 32, 8, 512, crop_ratio=1.0),
}
OFFICIAL_FILES = {  # what `load_encoder(name, weights=...)` / train.py --encoder-weights expects
    **{f"dinov2-{s}14{r}": f"dinov2_vit{s}14{'_reg4' if r else ''}_pretrain.pth" for s in "sblg" for r in ("", "-reg")},
    **{n: f"the Hugging Face folder google/siglip-{'base' if n[7] == 'b' else 'large'}-patch16-{n[-3:]}"
       for n in ENCODER_PRESETS if n.startswith("siglip")},
    **{f"clip-{s}": f"the OpenAI {v}.pt (TorchScript), an OpenCLIP {v} state dict of OpenAI's weights (visual.* "
                    f"keys, with act='quick_gelu') or the Hugging Face folder "
                    f"openai/clip-vit-{'base' if s == 'b16' else 'large'}-patch{s[1:]}"
       for s, v in (("b16", "ViT-B-16"), ("l14", "ViT-L-14"))},
    "mae-l16": "mae_pretrain_vit_large.pth (facebookresearch/mae, {'model': state_dict})",
}
FAMILY_NAMES = {"dinov2": "DINOv2", "siglip": "SigLIP", "clip": "CLIP image tower", "mae": "MAE encoder"}


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
    def __init__(self, dim, hidden, act):   # DINOv2/MAE: exact GELU; SigLIP: Flax nn.gelu = tanh; CLIP: QuickGELU
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(dim, hidden), nn.Linear(hidden, dim), act

    def forward(self, x):
        x = self.fc1(x)
        if self.act == "quick_gelu":                      # clip/model.py QuickGELU
            x = x * torch.sigmoid(1.702 * x)
        else:
            x = F.gelu(x, approximate="tanh" if self.act == "gelu_tanh" else "none")
        return self.fc2(x)


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
        dino = c.family == "dinov2"                       # LayerScale: DINOv2 only
        self.norm1 = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.attn = Attention(c.dim, c.heads)
        self.ls1 = LayerScale(c.dim) if dino else nn.Identity()
        self.norm2 = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.mlp = SwiGLU(c.dim, c.mlp_hidden) if c.swiglu else Mlp(c.dim, c.mlp_hidden, c.act)
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
        self.mlp = Mlp(c.dim, c.mlp_hidden, c.act)

    def forward(self, tokens):
        x = self.attn(self.probe.expand(tokens.shape[0], -1, -1), context=tokens)
        return (x + self.mlp(self.norm(x)))[:, 0]


class VisionEncoder(nn.Module):
    """A frozen ViT: images in [-1, 1] -> (global (B, E), tokens (B, T, D)); E = D except CLIP (`.embed_dim`).

    Attributes: `.name` (preset), `.config` (EncoderConfig), `.dim` (token width D, the cond_dim of
    Semantica's cross-attention), `.embed_dim` (global width E), `.weights` (path or None), `.seed`
    (seed of a random init, None when weights were loaded), `.num_patches` and `.num_tokens` at `.image_size`.
    """

    def __init__(self, config, name="custom"):
        super().__init__()
        c = self.config = config
        self.name, self.family, self.dim, self.embed_dim = name, c.family, c.dim, c.embed_dim or c.dim
        self.weights, self.seed = None, None
        self.image_size, self.patch_size = c.image_size, c.patch_size
        cls = c.family != "siglip"                                # SigLIP has no class token
        self.num_patches = c.num_patches
        self.num_tokens = int(cls) + c.registers + c.num_patches
        self.mean, self.std = NORMALISATION[c.family]
        # Attribute names are the official DINOv2 (= MAE) checkpoint keys (facebookresearch/dinov2
        # dinov2/models/vision_transformer.py); CLIP and
        # SigLIP files are renamed on load (_HF, _OPENAI below).
        if cls:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        if c.family == "dinov2":
            self.mask_token = nn.Parameter(torch.zeros(1, c.dim))   # iBOT training only: loaded, unused
            if c.registers:
                self.register_tokens = nn.Parameter(torch.zeros(1, c.registers, c.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, int(cls) + c.pos_grid ** 2, c.dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, c.dim, c.patch_size, c.patch_size, bias=c.family != "clip")
        if c.family == "clip":
            self.norm_pre = nn.LayerNorm(c.dim, eps=c.norm_eps)       # ln_pre
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim, eps=c.norm_eps)               # CLIP: ln_post
        if c.family == "siglip":
            self.head = MAPHead(c)
        if c.embed_dim:
            self.proj = nn.Parameter(torch.zeros(c.dim, c.embed_dim))  # CLIP: x @ proj

    def positions(self, gh, gw):
        """Position table for a (gh, gw) patch grid (facebookresearch/dinov2 vision_transformer.py interpolate_pos_encoding); SigLIP only at its native grid."""
        c = self.config
        if c.family == "siglip":
            if (gh, gw) != (c.pos_grid,) * 2:
                raise ValueError(f"{self.name}: SigLIP runs only at its native {self.image_size}px "
                                 f"({c.pos_grid}x{c.pos_grid} patches), got {gh}x{gw} patches")
            return self.pos_embed
        if c.family == "dinov2":             # *_reg4 hub models: antialias, no offset; others: offset 0.1
            antialias, offset = (True, 0.0) if c.registers else (False, 0.1)
        else:  # CLIP, MAE: bicubic size= (HF CLIP/ViTMAE interpolate_pos_encoding, mae util/pos_embed.py)
            antialias, offset = False, 0.0
        grid = interpolate_pos_embed(self.pos_embed[:, 1:], gh, gw, antialias=antialias, offset=offset)
        return torch.cat([self.pos_embed[:, :1], grid], dim=1)

    @torch.no_grad()
    def forward(self, images):
        """Frozen use (Semantica §3.2): `encode` without autograd and outside autocast, in the weights' dtype
        (float32): the condition is the same computation in training (under bf16 autocast), at sampling and
        in the feature cache."""
        self._check(images)
        with torch.autocast(images.device.type, enabled=False):
            return self.encode(images.to(self.pos_embed.dtype))

    def _check(self, images):
        """One-line ValueError unless `images` is a float tensor (B, 3, H, W) (uint8 would give NaN features)."""
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            what = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"{self.name}: expects float images (B, 3, H, W) in [-1, 1], got {what} "
                             f"(pages.images.image_batch converts PIL, numpy and uint8 images)")

    def encode(self, images):
        """[-1, 1] float images (B, 3, H, W) -> (global (B, E), tokens (B, T, D)), float32; with autograd,
        for the rare caller that trains an encoder (pages/toy_encoder.py). ValueError for other inputs."""
        self._check(images)
        B, _, H, W = images.shape
        p, c = self.patch_size, self.config
        if H % p or W % p:
            raise ValueError(f"{self.name}: image size {H}x{W} is not a multiple of the patch size {p}")
        mean, std = (images.new_tensor(m).view(1, 3, 1, 1) for m in (self.mean, self.std))
        x = ((images + 1) / 2 - mean) / std                       # [-1, 1] -> the encoder's own normalisation
        x = rearrange(self.patch_embed.proj(x), "b d h w -> b (h w) d")
        if c.family != "siglip":
            x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)
        x = x + self.positions(H // p, W // p).to(x.dtype)
        if c.registers:                                           # registers carry no position embedding
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1).to(x.dtype), x[:, 1:]], dim=1)
        if c.family == "clip":
            x = self.norm_pre(x)
        for block in self.blocks:
            x = block(x)
        # INTERPRETATION (CLIP): the tokens are ln_post of the whole final sequence, unprojected, as
        # open_clip's output_tokens (ln_post before pooling); CLIP itself only returns ln_post(CLS) @ proj.
        x = self.norm(x)
        g = self.head(x) if c.family == "siglip" else x[:, 0]
        if c.embed_dim:
            g = g @ self.proj.to(g.dtype)
        return g.float(), x.float()     # DESIGN: float32 out, also under bf16 autocast

    def preprocess(self, images):
        """Official eval preprocessing on [-1, 1] float tensors (B, 3, H, W) -> (B, 3, image_size, image_size)
        in [-1, 1]; float32 also under autocast (interpolation is not one of autocast's lower-precision ops)."""
        self._check(images)
        s, (h, w) = self.image_size, images.shape[-2:]
        if self.family == "siglip":                                # squash-resize, no crop
            return _resize(images, (s, s))
        short = round(s / self.config.crop_ratio)                  # 224 -> Resize(256); CLIP: Resize(224)
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
        if name.endswith(("gamma", "norm1.weight", "norm2.weight", "norm.weight", "norm_pre.weight")):
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
_HF = [  # HF SiglipVisionModel / CLIPVisionModel names (4.x hub files: transformers modeling_siglip.py / modeling_clip.py) -> ours
    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^embeddings\.position_embedding\.weight$", "pos_embed"),
    (r"^embeddings\.class_embedding$", "cls_token"),
    (r"^pre_layrnorm\.", "norm_pre."),                                           # sic: HF CLIP's spelling
    (r"^encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.", r"blocks.\1.attn.\2."),   # concatenated below
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"^post_layernorm\.", "norm."),
    (r"^visual_projection\.weight$", "proj"),                                    # nn.Linear (E, D): transposed
    (r"^head\.attention\.in_proj_(weight|bias)$", r"head.attn.qkv.\1"),         # rows already [q; k; v]
    (r"^head\.attention\.out_proj\.", "head.attn.proj."),
    (r"^head\.layernorm\.", "head.norm."),
]
_OPENAI = [  # OpenAI CLIP / OpenCLIP `visual.*` names (clip/model.py VisionTransformer) -> ours
    (r"^conv1\.", "patch_embed.proj."),
    (r"^class_embedding$", "cls_token"),
    (r"^positional_embedding$", "pos_embed"),
    (r"^ln_pre\.", "norm_pre."),
    (r"^transformer\.resblocks\.(\d+)\.ln_(\d)\.", r"blocks.\1.norm\2."),
    (r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_", r"blocks.\1.attn.qkv."),   # nn.MultiheadAttention [q; k; v]
    (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"blocks.\1.mlp.fc1."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"blocks.\1.mlp.fc2."),
    (r"^ln_post\.", "norm."),
]
_HF_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_JIT_ACT = {"QuickGELU": "quick_gelu", "GELU": "gelu"}  # class of the MLP's `gelu` module: clip/model.py, open_clip
_FAMILY_ACT = {"dinov2": "gelu", "mae": "gelu", "siglip": "gelu_tanh"}  # every release of these families; CLIP: two
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")
CLIP_ACTIVATIONS = ("quick_gelu", "gelu")  # OpenAI weights (QuickGELU); open_clip's nn.GELU (LAION, DataComp)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile's OptimizedModule


def strip_prefixes(key):
    """The one key rule for every state dict the project reads (encoder files here, Semantica checkpoints in
    semantica.py, training checkpoints in machinery/runs.py; machinery/inception.py keeps a commented twin so
    that it imports no project module): "module." / "_orig_mod." prefixes of wrapped or compiled models, in any order and number,
    are removed: "_orig_mod.module.net.x" -> "net.x"."""
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _rename(sd, table):
    """Apply a rename table; CLIP's (D,) class embedding and (N, D) tables get our (1, 1, D) / (1, N, D)."""
    out = {}
    for k, v in sd.items():
        for pattern, repl in table:
            k = re.sub(pattern, repl, k)
        out[k] = v.reshape(1, 1, -1) if k == "cls_token" else v[None] if k == "pos_embed" and v.ndim == 2 else v
    return out


def _from_hf(sd):
    """HF SigLIP/CLIP: keep the vision tower (+ CLIP's visual_projection), rename, concatenate q, k, v."""
    if any(k.startswith("vision_model.") for k in sd):
        sd = {k.removeprefix("vision_model."): v for k, v in sd.items()
              if k.startswith("vision_model.") or k == "visual_projection.weight"}
    out = _rename({k: v for k, v in sd.items() if not k.endswith("position_ids")}, _HF)  # old buffer
    if "proj" in out:
        out["proj"] = out["proj"].T
    for k in [k for k in out if re.fullmatch(r"blocks\.\d+\.attn\.q\.(weight|bias)", k)]:
        pre, kind = k.rsplit(".q.", 1)
        out[f"{pre}.qkv.{kind}"] = torch.cat([out.pop(f"{pre}.{c}.{kind}") for c in "qkv"])
    return out


def _activation(family, hf, act, file):
    """The MLP activation of a file's tower: what the file records (`hf["hidden_act"]`), else the family's only
    one, else the caller's `act`. CLIP has two: QuickGELU (OpenAI's weights, open_clip's `-quickgelu` configs)
    and exact GELU (open_clip's default nn.GELU: LAION, DataComp), and an OpenCLIP `visual.*` state dict or a
    bare model.safetensors does not record which, so such a file needs `act`. ValueError (one line) for an
    unknown activation, an `act` the file contradicts, or a CLIP file with neither."""
    if act is not None and act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {list(ACTIVATIONS)}, got {act!r}")
    recorded = (hf or {}).get("hidden_act")
    if recorded is not None and recorded not in _HF_ACT:
        raise ValueError(f"{file}: MLP activation {recorded!r} is not one of {sorted(_HF_ACT)}")
    known = _HF_ACT.get(recorded) or _FAMILY_ACT.get(family)
    if act is not None and known is not None and act != known:
        raise ValueError(f"{file}: this {FAMILY_NAMES[family]} file runs activation {known}, not act={act!r}")
    if known is None and act is None:
        raise ValueError(f"{file}: a CLIP image tower whose file does not record its MLP activation (an OpenCLIP "
                         f"visual.* state dict, or no config.json): state it, act= / --encoder-act: quick_gelu (OpenAI "
                         f"weights, open_clip -quickgelu models) or gelu (open_clip's nn.GELU: LAION, DataComp)")
    return known or act


def _family(sd):
    """Which encoder a state dict in our names holds (None: none of them)."""
    if "head.probe" in sd:
        return "siglip"
    if "norm_pre.weight" in sd:                                     # ln_pre: CLIP only
        return "clip"
    if (any(re.fullmatch(r"blocks\.\d+\.ls[12]\.gamma", k) for k in sd) or "register_tokens" in sd
            or getattr(sd.get("mask_token"), "ndim", 0) == 2):        # DINOv2's iBOT mask token is (1, D)
        return "dinov2"
    if "cls_token" in sd and "blocks.0.attn.qkv.weight" in sd:
        return "mae"
    return None


def _is_torchscript(file):
    with zipfile.ZipFile(file) as z:                                # torch.serialization's own test
        return any(n.endswith("constants.pkl") for n in z.namelist())


def load_failure(e):
    """Why torch.load(..., weights_only=True) raised `e`, in one line, for the callers' one-line errors.

    A pickle of anything but tensors and plain containers (or no torch file at all) says so, never torch's
    advice to retry with weights_only=False, which would run the file's code; any other error (a truncated
    zip, an unreadable file) gives its type and first line."""
    if isinstance(e, pickle.UnpicklingError):
        return "not a torch file of tensors and plain containers"
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def _read(path):
    """Return (state dict in our names, family or None, what the file records beyond shapes or None: the HF vision
    config (config.json), or a TorchScript archive's activation as {"hidden_act": ...}; the file read)."""
    path = Path(path)
    names = ("model.safetensors", "pytorch_model.bin")             # Hugging Face folder
    file = next((path / n for n in names if (path / n).is_file()), path / names[0]) if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: checkpoint file not found")
    hf = None
    try:
        if file.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError as e:
                raise ImportError(f"{file}: reading .safetensors needs the optional extra: "
                                  "pip install safetensors") from e
            sd = load_file(str(file))
        elif zipfile.is_zipfile(file) and _is_torchscript(file):     # the OpenAI CLIP .pt: only its tensors
            with warnings.catch_warnings():                          # "torch.jit.load is deprecated": the
                warnings.simplefilter("ignore", DeprecationWarning)  # release is TorchScript all the same
                archive = torch.jit.load(str(file), map_location="cpu")
            sd = archive.state_dict()
            acts = {m.original_name for n, m in archive.named_modules()  # the archive keeps its module classes
                    if re.fullmatch(r"visual\.transformer\.resblocks\.\d+\.mlp\.gelu", n)}
            if len(acts) == 1:
                (name,) = acts
                hf = {"hidden_act": _JIT_ACT.get(name, name)}
        else:
            sd = torch.load(file, map_location="cpu", weights_only=True)
    except ImportError:
        raise
    except Exception as e:
        raise ValueError(f"{file}: cannot read checkpoint (corrupt or truncated?): {load_failure(e)}") from e
    if isinstance(sd, dict) and isinstance(sd.get("model", sd.get("state_dict")), dict):
        sd = sd.get("model", sd.get("state_dict"))                   # MAE {"model": ...}; OpenCLIP training files
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{file}: expected a state dict of tensors (an official weights file)")
    sd = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", strip_prefixes(k)): v
          for k, v in sd.items()}                                   # DINOv2 chunked blocks.c.N; wrapper prefixes
    if any(k.startswith("visual.") for k in sd):                    # OpenAI / OpenCLIP: drop the text tower
        sd = _rename({k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}, _OPENAI)
    elif any(k.startswith(("vision_model.", "embeddings.patch_embedding")) for k in sd):
        sd, cfg = _from_hf(sd), file.parent / "config.json"
        if cfg.is_file():
            c = json.loads(cfg.read_text())
            hf = c.get("vision_config", c)
    family = _family(sd)
    if family == "mae":                                             # decoder of the full pretraining model
        sd = {k: v for k, v in sd.items() if not k.startswith(("decoder_", "mask_token"))}
    return sd, family, hf, file


def _infer_config(sd, family, hf, heads, file, act=None):
    """Architecture from tensor shapes (+ heads and eps from an HF config.json; the activation: `_activation`)."""
    need = [k for k in ("pos_embed", "patch_embed.proj.weight", "norm.weight", "blocks.0.norm1.weight") if k not in sd]
    if need or family is None:
        raise ValueError(f"{file}: not a DINOv2, SigLIP, CLIP or MAE vision checkpoint"
                         + (f": missing keys {need}" if need else ""))
    hf = hf or {}
    D, _, p, _ = sd["patch_embed.proj.weight"].shape
    n = sd["pos_embed"].shape[1] - (family != "siglip")
    grid = math.isqrt(n)
    if grid * grid != n:
        raise ValueError(f"{file}: position table of {n} entries is not a square grid")
    heads = heads or hf.get("num_attention_heads") or D // 64       # clip/model.py: heads = width // 64
    if heads < 1 or D % heads:
        raise ValueError(f"{file}: cannot infer the head count for width {D}; pass heads=")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    swiglu = "blocks.0.mlp.w12.weight" in sd
    hidden = sd["blocks.0.mlp.w3.weight"].shape[1] if swiglu else sd["blocks.0.mlp.fc1.weight"].shape[0]
    size, act = grid * p, _activation(family, hf, act, file)
    if family == "siglip":
        return EncoderConfig("siglip", D, depth, heads, p, size, grid, hidden, crop_ratio=1.0,
                             act=act, norm_eps=hf.get("layer_norm_eps", 1e-6))
    if family == "clip":
        return EncoderConfig("clip", D, depth, heads, p, size, grid, hidden, crop_ratio=1.0, act=act,
                             norm_eps=hf.get("layer_norm_eps", 1e-5), embed_dim=sd["proj"].shape[1] if "proj" in sd else 0)
    if family == "mae":                                             # mae util/datasets.py: crop 224/256 up to 224
        return EncoderConfig("mae", D, depth, heads, p, size, grid, hidden, crop_ratio=224 / 256 if size <= 224 else 1.0)
    official = p == 14 and grid == 37                              # 518px table, evaluated at 224
    reg = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    return EncoderConfig("dinov2", D, depth, heads, p, 224 if official else size, grid, hidden, reg, swiglu,
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


def from_checkpoint(path, heads=None, act=None):
    """Build the encoder that an official file describes (DINOv2 .pth, SigLIP/CLIP HF folder, OpenAI CLIP
    .pt, OpenCLIP state dict, MAE .pth); its name is the matching preset's, else "<family>-custom".
    heads: for a file that does not record it (default width // 64); act: the MLP activation of a CLIP file
    that does not record it, "quick_gelu" or "gelu" (an OpenCLIP `visual.*` state dict: required).
    Raises ValueError (one line) for an unreadable or unknown file, a missing or contradicted `act`."""
    sd, family, hf, file = _read(path)
    config = _infer_config(sd, family, hf, heads, file, act)
    name = next((n for n, c in ENCODER_PRESETS.items() if c == config), f"{config.family}-custom")
    enc = _load_state(_build(config, name), sd, file)
    enc.weights = str(path)                  # identifier to store next to the name in checkpoints
    return _freeze(enc)


def random_encoder(config, name, seed=0):
    """A frozen encoder of `config` (EncoderConfig, a preset's or another) with random weights, deterministic in
    `seed` (`.seed`) and independent of the global RNG: load_encoder's weight-less path (the start of
    pages/toy_encoder.py's training, then written with save_dinov2). The seed is part of the
    network's definition (like a weights file), hence a fixed default: (name, seed) is always the same network."""
    enc = _random_init(_build(config, name), seed)
    enc.seed = seed
    return _freeze(enc)


def load_encoder(name, weights=None, seed=0, act=None):
    """Preset by name; with `weights` the file must hold that preset exactly (a file of another encoder
    family is a ValueError naming what was expected and found); without them the weights are random,
    deterministic in `seed` (`.seed`; see random_encoder: a fixed default, the seed defines the network).
    act: the MLP activation of a CLIP file that does not record it (from_checkpoint); it must be the preset's.
    An unknown name with `weights` falls back to from_checkpoint(weights, act=act)."""
    if name not in ENCODER_PRESETS:
        if weights is not None:
            return from_checkpoint(weights, act=act)
        raise KeyError(f"unknown encoder {name!r}; presets: {sorted(ENCODER_PRESETS)}")
    config = ENCODER_PRESETS[name]
    if weights is None:
        if act not in (None, config.act):
            raise ValueError(f"{name} runs {config.act}; act={act!r} applies to a weights file")
        return random_encoder(config, name, seed)
    sd, family, hf, file = _read(weights)
    if family != config.family:
        found = f"a {FAMILY_NAMES[family]} checkpoint" if family else "no known encoder"
        want = OFFICIAL_FILES.get(name, f"a {FAMILY_NAMES[config.family]} checkpoint")
        raise ValueError(f"{file}: {name} expects {want}, found {found}")
    act, eps = _activation(family, hf, act, file), (hf or {}).get("layer_norm_eps", config.norm_eps)
    if (act, eps) != (config.act, config.norm_eps):          # what only the file or `act` says must agree
        raise ValueError(f"{file}: the file's tower has activation {act}, LayerNorm eps {eps}; {name} uses "
                         f"{config.act}, {config.norm_eps} (from_checkpoint loads it as {family}-custom)")
    enc = _load_state(_build(config, name), sd, file)
    enc.weights = str(weights)
    return _freeze(enc)


def save_dinov2(encoder, path):
    """Write a DINOv2-architecture encoder as an official-format backbone .pth (flat state dict)."""
    if encoder.family != "dinov2":
        raise ValueError(f"{encoder.name}: only DINOv2 encoders have an official .pth layout")
    torch.save({k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}, path)
