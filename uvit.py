"""The simple-diffusion U-ViT denoiser, conditioned on frozen encoder tokens by cross-attention.

Semantica (arXiv 2405.14857v3) §3.3-§3.4, §6.1, App. D; the U-ViT of *simple diffusion*
(Hoogeboom, Heek & Salimans, arXiv 2301.11093, §3-§4, Fig. 7). No official code exists for either;
consulted: lucidrains/denoising-diffusion-pytorch
`simple_diffusion.py` @faed4db (qk-norm attention, FiLM-modulated MLP hidden layer) and the Google
UNet lineage google-research `ddpm_w_distillation/unet3.py` (ResBlock, zero-initialised outputs).

    z_t (B, 3, S, S) --stem (p x p conv, p = 1 or 2)--> conv ResBlock levels (U-Net skips)
      --> transformer levels (self-attention + MLP, residual only) --> lowest-resolution
      transformer (self-attention, cross-attention to the encoder tokens, MLP) --> mirror back up --> v

- The noise level enters as t in [0, 1] itself, never inv_cos of the shifted log-SNR (google-research
  ddpm_w_distillation unet3.py's input, squashed near 1 under the shift): sinusoidal features of TIME_SCALE * t -> MLP -> `emb`, which modulates every ResBlock
  (GroupNorm scale/shift) and every transformer MLP hidden layer (FiLM).
- Conditioning (§3.4): "cross_attention": tokens (B, T_c, cond_dim) -> LayerNorm -> Linear ->
  LayerNorm, attended to by a cross-attention block after every self-attention block of the
  lowest-resolution transformer only. "film" (App. D): the global feature (B, cond_dim) is
  normalised, projected by a Linear and added to the time embedding.
- The network knows nothing about alpha, sigma or guidance: it maps (z_t, t, cond) -> v.

Shapes: B batch, S image side, C channels of a conv level, N = h*w tokens, D transformer width,
T_c condition tokens. Speed: attention goes through F.scaled_dot_product_attention with no mask
(flash kernels), head dim 64 on the paper presets; forward has no host syncs and no data-dependent
Python branches, so it runs under bf16 autocast, channels_last inputs and torch.compile.
Not implemented: simple diffusion's DWT downsampling and multiscale loss, SiD2's residual U-ViT.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

TIME_SCALE = 1000.0   # Google UNet (ddpm_w_distillation unet3.py) embeds 1000 * u: frequencies span t-steps of 1e-3
MAX_PERIOD = 10000.0  # Transformer sinusoid (Vaswani et al. 2017)


def group_count(channels):
    """GroupNorm groups: 32 (Google UNet) for wide levels, channels // 4 for the tiny presets."""
    return min(32, channels // 4)


@dataclass(frozen=True)
class UViTConfig:
    """Architecture of the U-ViT. Defaults are the §6.1 baseline ("sid-b-256")."""
    image_size: int = 256                   # §6.1: "operates on 256x256 images"
    patch_size: int = 1                     # §6.1: "initial 1x1 convolution" (2x2 patchify at 512 px)
    channels: tuple = (128, 128, 256, 512)  # §6.1: "four downsampling stages have 128, 128, 256 and 512 channels"
    blocks: tuple = (3, 3, 3, 3)            # §6.1, INTERPRETATION: "first three stages have three blocks each
    #   and the last stage has sixteen blocks" read as 3 blocks in each of the four stages and 16 in the
    #   final transformer stage (the 1024-channel stage below them); mirrored on the way up.
    transformer_levels: int = 1             # §6.1: transformers at 32x32 (last downsampling stage) and 16x16
    width: int = 1024                       # §6.1: "the final transformer has 1024 channels" (at 16x16)
    depth: int = 16                         # §6.1: "sixteen blocks" (see `blocks`)
    head_dim: int = 64                      # DESIGN: ViT convention; heads = width // head_dim
    mlp_ratio: int = 4                      # DESIGN: ViT convention
    cond_dim: int = 768                     # §6.2: DINOv2 B/14 tokens (set to encoder.dim)
    conditioning: str = "cross_attention"   # §3.4; "film" = the App. D alternative
    dropout: float = 0.1                    # INTERPRETATION: simple diffusion adds dropout, "not on the highest
    #   resolution feature maps"; we use it in the transformer MLPs only (lucidrains' reading), rate assumed.

    def __post_init__(self):
        levels = len(self.channels)
        if self.conditioning not in ("cross_attention", "film"):
            raise ValueError(f"conditioning must be 'cross_attention' or 'film', got {self.conditioning!r}")
        if len(self.blocks) != levels or not 0 <= self.transformer_levels <= levels:
            raise ValueError(f"channels {self.channels}, blocks {self.blocks} and transformer_levels "
                             f"{self.transformer_levels} do not describe the same levels")
        if self.image_size % (self.patch_size * 2 ** levels):
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size * 2^levels")
        for d in (self.width, *self.channels[levels - self.transformer_levels:]):
            if d % self.head_dim:
                raise ValueError(f"transformer width {d} is not a multiple of head_dim {self.head_dim}")
        for c in self.channels[:levels - self.transformer_levels]:
            if c % 4 or c % group_count(c):
                raise ValueError(f"conv channels {c} must be a multiple of 4 and of min(32, c // 4)")

    @property
    def lowest_size(self):
        """Side of the lowest-resolution (final transformer) feature map: 16 in the paper."""
        return self.image_size // self.patch_size // 2 ** len(self.channels)


# Parameter counts in the comments are computed with cond_dim as given (tests/test_uvit.py asserts them).
PRESETS = {
    # §6.1 baseline "SiD B": 1x1 stem; conv levels 128, 128, 256 at 256, 128, 64 px; a 512-wide transformer
    # level at 32x32; the 1024-wide, 16-block cross-attention transformer at 16x16. 391.6M (392M)
    "sid-b-256": UViTConfig(),
    # "SiD L" of Table 1, whose size the paper does not give. INTERPRETATION: the SiD B levels with only
    # the 16x16 transformer scaled (simple diffusion: scaling the 16x16 level suffices), 1.5x wider and
    # 1.5x deeper: 1536 channels (24 heads of 64) x 24 blocks; DINOv2-L tokens (Table 1). 1.117B
    "sid-l-256": UViTConfig(width=1536, depth=24, cond_dim=1024),
    # §6.1 final model: 2x2 patchify; 128, 256, 1024, 2048, 4096 channels with 2, 3, 3, 3, 12 blocks,
    # i.e. four downsampling stages + the 4096-wide final transformer (12 blocks) at 16x16; transformers
    # at 32x32 and 16x16 as at 256 px. INTERPRETATION: DINOv2-L/14 tokens (Table 1's best encoder). 4.035B
    "semantica-512": UViTConfig(image_size=512, patch_size=2, channels=(128, 256, 1024, 2048),
                                blocks=(2, 3, 3, 3), width=4096, depth=12, cond_dim=1024),
    # DESIGN: CPU toy runs (docs/study.md, the CPU benchmarks): 32/64-channel conv levels at 32/16 px,
    # a 128-wide 4-block cross-attention transformer at 8x8; "tiny" encoder tokens (128-dim). 2.01M
    "tiny-32": UViTConfig(image_size=32, channels=(32, 64), blocks=(1, 1), transformer_levels=0,
                          width=128, depth=4, head_dim=32, cond_dim=128, dropout=0.0),
    # DESIGN (docs/study.md): the CPU default job's and the claims' model. tiny-32 with a 2x2 patchify stem, as
    # §6.1's 512 px model: conv levels at 16 and 8 px, the transformer at 4x4. Measured ~3x tiny-32's training
    # and ~4x its sampling speed on a CPU. 2.00M
    "tiny-32-p2": UViTConfig(image_size=32, patch_size=2, channels=(32, 64), blocks=(1, 1), transformer_levels=0,
                             width=128, depth=4, head_dim=32, cond_dim=128, dropout=0.0),
    # DESIGN: 64 px toy experiments: conv levels 32, 64 channels at 64, 32 px; a 128-wide transformer level
    # at 16x16; a 256-wide 6-block cross-attention transformer at 8x8; "tiny" encoder tokens. 10.2M
    "small-64": UViTConfig(image_size=64, channels=(32, 64, 128), blocks=(1, 2, 2), width=256, depth=6,
                           head_dim=32, cond_dim=128, dropout=0.0),
}


def zero_init(module):
    """Zero the weights and bias, so that a residual branch starts as the identity (Google UNet)."""
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


def time_features(t, dim):
    """Sinusoidal features of TIME_SCALE * t; t (B,) in [0, 1] -> (B, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = TIME_SCALE * t.float()[:, None] * freqs  # (B, dim/2)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3, GroupNorm with time scale/shift, SiLU-conv3x3 (zero-init) + shortcut.

    Google UNet lineage (google-research ddpm_w_distillation unet3.py ResnetBlock); no dropout (simple diffusion: not at high resolution).
    """

    def __init__(self, c_in, c_out, emb_dim):
        super().__init__()
        self.norm1 = nn.GroupNorm(group_count(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(group_count(c_out), c_out)
        self.conv2 = zero_init(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb, context=None):                      # x (B, C_in, H, W), emb (B, E) after SiLU
        h = self.conv1(F.silu(self.norm1(x)))                      # (B, C, H, W)
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)            # FiLM (Perez et al. 2018)
        return self.shortcut(x) + self.conv2(h)


class Attention(nn.Module):
    """Multi-head (self- or cross-) attention with LayerNorm on q and k (ViT-22B, arXiv 2302.05442).

    # DESIGN: the q/k-normalisation flavour (LayerNorm on q and k, as ViT-22B); output projection zero-initialised.
    """

    def __init__(self, dim, head_dim, cross=False):
        super().__init__()
        self.heads, self.cross = dim // head_dim, cross
        self.q = nn.Linear(dim, dim) if cross else None
        self.qkv = nn.Linear(dim, 2 * dim if cross else 3 * dim)   # kv from the context when cross
        self.q_norm, self.k_norm = nn.LayerNorm(head_dim), nn.LayerNorm(head_dim)
        self.proj = zero_init(nn.Linear(dim, dim))

    def forward(self, x, context=None):                            # x (B, N, D), context (B, T_c, D)
        if self.cross:
            q, (k, v) = self.q(x), self.qkv(context).chunk(2, dim=-1)
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (rearrange(a, "b n (h d) -> b h n d", h=self.heads) for a in (q, k, v))
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)  # LayerNorm runs in fp32 under autocast
        out = F.scaled_dot_product_attention(q, k, v)             # (B, heads, N, head_dim); no mask: flash
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention [+ cross-attention to the tokens, §3.4] + MLP with a FiLM hidden layer.

    The MLP hidden layer is modulated by the time embedding: act(W1 x) * (1 + scale) + shift (simple
    diffusion via lucidrains ae64cc5); dropout sits there, the output projection is zero-initialised.
    """

    def __init__(self, dim, head_dim, mlp_ratio, emb_dim, dropout, cross):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, head_dim)
        self.norm2 = nn.LayerNorm(dim) if cross else None
        self.cross_attn = Attention(dim, head_dim, cross=True) if cross else None
        self.norm3, self.fc1 = nn.LayerNorm(dim), nn.Linear(dim, mlp_ratio * dim)
        self.film = nn.Linear(emb_dim, 2 * mlp_ratio * dim)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = zero_init(nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x, emb, context=None):                       # x (B, N, D), emb (B, E) after SiLU
        x = x + self.attn(self.norm1(x))
        if self.cross_attn is not None:                            # fixed at construction, not data-dependent
            x = x + self.cross_attn(self.norm2(x), context)        # §3.4: "followed by a cross-attention block"
        scale, shift = self.film(emb)[:, None].chunk(2, dim=-1)    # (B, 1, 4D) each
        h = F.gelu(self.fc1(self.norm3(x))) * (1 + scale) + shift
        return x + self.fc2(self.dropout(h))


class UViT(nn.Module):
    """forward(z_t (B, 3, S, S), t (B,) in [0, 1], cond) -> v (B, 3, S, S).

    cond: encoder tokens (B, T_c, cond_dim) for "cross_attention", a global feature (B, cond_dim) for
    "film". Set `grad_checkpoint = True` to recompute every block's activations in the backward pass.
    """

    def __init__(self, config: UViTConfig):
        super().__init__()
        c, self.config, self.grad_checkpoint = config, config, False
        levels, emb_dim = len(c.channels), 4 * c.channels[0]  # DESIGN: time embedding 4x the stem width (Google UNet)
        self.is_transformer = [i >= levels - c.transformer_levels for i in range(levels)]
        self.time_embed = nn.Sequential(nn.Linear(c.channels[0], emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if c.conditioning == "film":  # App. D / §3.4: normalise the CLS token, dense projection, add to time
            # INTERPRETATION: "we normalize the CLS token" read as a LayerNorm (learned affine) before the Linear.
            self.cond_embed = nn.Sequential(nn.LayerNorm(c.cond_dim), nn.Linear(c.cond_dim, emb_dim))
        else:                         # §3.4: projected and normalised encoder tokens for the cross-attention
            self.cond_embed = nn.Sequential(nn.LayerNorm(c.cond_dim), nn.Linear(c.cond_dim, c.width),
                                            nn.LayerNorm(c.width))
        p = c.patch_size
        self.stem = nn.Conv2d(3, c.channels[0], kernel_size=p, stride=p)  # §6.1: 1x1 conv, or 2x2 patchify

        def make(i, ch, skip):  # a conv level's up blocks also read the concatenated U-Net skip
            if self.is_transformer[i]:
                return TransformerBlock(ch, c.head_dim, c.mlp_ratio, emb_dim, c.dropout, cross=False)
            return ResBlock(ch + skip, ch, emb_dim)

        self.down_levels, self.up_levels = nn.ModuleList(), nn.ModuleList()
        self.downsamples, self.upsamples = nn.ModuleList(), nn.ModuleList()
        for i, (ch, n, out) in enumerate(zip(c.channels, c.blocks, (*c.channels[1:], c.width))):
            self.down_levels.append(nn.ModuleList([make(i, ch, 0) for _ in range(n)]))
            self.up_levels.append(nn.ModuleList([make(i, ch, ch) for _ in range(n)]))
            # DESIGN: resampling = a linear map per 2x2 patch (space-to-depth / depth-to-space), which
            # also changes the width; the paper does not say how it resamples.
            self.downsamples.append(nn.Conv2d(ch, out, kernel_size=2, stride=2))
            self.upsamples.append(nn.ConvTranspose2d(out, ch, kernel_size=2, stride=2))
        n_low = c.lowest_size ** 2
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, n_low, c.width))  # DESIGN: learned, small
        self.mid_transformer = nn.ModuleList([
            TransformerBlock(c.width, c.head_dim, c.mlp_ratio, emb_dim, c.dropout, cross=c.conditioning == "cross_attention")
            for _ in range(c.depth)])
        self.final_layer = nn.Sequential(nn.GroupNorm(group_count(c.channels[0]), c.channels[0]), nn.SiLU(),
                                         zero_init(nn.ConvTranspose2d(c.channels[0], 3, kernel_size=p, stride=p)))

    def _run(self, block, x, emb, context=None):
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, emb, context, use_reentrant=False)
        return block(x, emb, context)

    def _level(self, i, blocks, x, emb, skips, down):
        """Run one level's blocks on a (B, C, H, W) map; conv levels push (down) or pop (up) skips."""
        if self.is_transformer[i]:  # transformer levels: residual connections only (simple diffusion Fig. 7)
            h = x.shape[-2]
            x = rearrange(x, "b c h w -> b (h w) c")                 # (B, N, C); a view for channels_last
            for blk in blocks:
                x = self._run(blk, x, emb)
            return rearrange(x, "b (h w) c -> b c h w", h=h)
        for blk in blocks:
            x = self._run(blk, x if down else torch.cat([x, skips.pop()], dim=1), emb)
            if down:
                skips.append(x)
        return x

    def forward(self, z_t, t, cond):
        c, b = self.config, z_t.shape[0]
        if cond.shape[0] != b:  # static shapes: a Python check, no host sync
            raise ValueError(f"cond has batch {cond.shape[0]} but z_t has batch {b}")
        dtype = self.stem.weight.dtype  # bf16 when the weights are (FSDP mixed precision); no-op otherwise
        z_t, cond, t = z_t.to(dtype), cond.to(dtype), t.reshape(-1).expand(b)  # (B,); a scalar t is broadcast
        emb = self.time_embed(time_features(t, c.channels[0]).to(dtype))       # (B, E)
        context = None
        if c.conditioning == "film":
            emb = emb + self.cond_embed(cond)                        # §3.4: CLS -> norm -> dense, added to time
        else:
            context = self.cond_embed(cond)                          # (B, T_c, D)
        emb = F.silu(emb)                                            # every FiLM Linear reads silu(emb)

        x, skips = self.stem(z_t), []                                # (B, C0, S/p, S/p)
        for i, (blocks, downsample) in enumerate(zip(self.down_levels, self.downsamples)):
            x = downsample(self._level(i, blocks, x, emb, skips, down=True))
        h = x.shape[-2]
        x = rearrange(x, "b c h w -> b (h w) c") + self.pos_embed    # (B, 256, D) at 16x16
        for blk in self.mid_transformer:
            x = self._run(blk, x, emb, context)
        x = rearrange(x, "b (h w) c -> b c h w", h=h)
        for i in reversed(range(len(self.up_levels))):
            x = self._level(i, self.up_levels[i], self.upsamples[i](x), emb, skips, down=False)
        return self.final_layer(x)                                    # (B, 3, S, S)
