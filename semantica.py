"""Semantica: a frozen image encoder conditions a U-ViT diffusion decoder that generates variations.

Semantica (arXiv 2405.14857v3): §3.2 frozen encoder, §3.3 diffusion decoder (uvit.py), §3.4
conditioning (encoder tokens by cross-attention, or the CLS token by FiLM, App. D), §6.1 training
and sampling settings (v-prediction with the eps-space loss, DDPM sampler, guidance 0.5). The
diffusion math lives in diffusion.py and the network in uvit.py; this file joins them:

    cond image --encoder.preprocess--> frozen encoder (no grad) --> tokens (B, T_c, D) | CLS (B, D)
      --condition dropout (p_uncond, to a learned null)--> UViT(z_t, t, cond) -> v --> diffusion_loss

- The encoder is frozen and deliberately *not* a registered submodule: it is never in
  parameters(), state_dict(), the EMA, the optimiser or a checkpoint (checkpoints store its name
  and weight-file path). `.to()`/`.cuda()` still move it, and copies (EMA) share it.
- Classifier-free guidance (Ho & Salimans 2022): training replaces the condition by a learned null
  with probability p_uncond through torch.where on a per-example mask (static shapes, XLA-friendly);
  sampling runs the conditional and null passes as one batch and combines them with
  diffusion.guided, (1 + w) v_cond - w v_null (w = 0: purely conditional).

Shapes: B batch, n samples per condition, S image side, T_c encoder tokens, D encoder width.
Not implemented: precomputing encoder features offline (pass `cond` tensors to loss/sample instead).
"""
import copy
import dataclasses

import torch
from torch import nn

import diffusion
from uvit import UViT, UViTConfig

P_UNCOND = 0.1  # INTERPRETATION: the paper does not state its condition-dropout rate; 0.1 as in Google's
#                 guided-diffusion configs and Ho & Salimans (diffusion.md §4)


class Semantica(nn.Module):
    """Frozen encoder + trainable U-ViT (`.net`) + learned null condition (`.null_cond`)."""

    def __init__(self, config: UViTConfig, encoder=None, p_uncond=P_UNCOND, encoder_spec=None):
        super().__init__()
        if encoder is not None and encoder.dim != config.cond_dim:
            raise ValueError(f"encoder {getattr(encoder, 'name', '?')} gives {encoder.dim}-dim features but the "
                             f"U-ViT expects cond_dim={config.cond_dim}; use "
                             f"dataclasses.replace(config, cond_dim={encoder.dim})")
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
        self.config, self.p_uncond = config, p_uncond
        self.net = UViT(config)
        self.cross = config.conditioning == "cross_attention"
        # DESIGN: one learned null token (broadcast over the T_c tokens) or one null CLS vector
        # (diffusion.md §4); it passes through the same norm + projection as real conditions.
        self.null_cond = nn.Parameter(0.02 * torch.randn((1, 1, config.cond_dim) if self.cross else (1, config.cond_dim)))
        if encoder_spec is None and encoder is not None:
            encoder_spec = {"name": encoder.name, "weights": getattr(encoder, "weights", None)}
        self.encoder_spec = encoder_spec
        if encoder is not None:
            encoder.eval().requires_grad_(False)
        self.__dict__["encoder"] = encoder  # a plain attribute: nn.Module does not register it

    # -- the frozen encoder stays outside the module tree but follows the model around
    def _apply(self, fn, recurse=True):
        if self.encoder is not None:        # .to(device) / .cuda() / .double() also move the encoder
            self.encoder._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def __deepcopy__(self, memo):
        """deepcopy (the EMA) shares the one frozen encoder instead of duplicating it."""
        memo[id(self.encoder)] = self.encoder
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    # -- conditioning
    @torch.no_grad()
    def condition(self, images):
        """Images in [-1, 1] (B, 3, H, W) -> tokens (B, T_c, D) for cross-attention or CLS (B, D) for FiLM."""
        if self.encoder is None:
            raise RuntimeError("this Semantica has no encoder: pass precomputed cond tensors, or build it "
                               "with encoder=encoders.load_encoder(...)")
        global_feature, tokens = self.encoder(self.encoder.preprocess(images))  # §3.4
        return tokens if self.cross else global_feature

    def _as_cond(self, cond):
        """Images (4-D) go through the encoder; precomputed tokens / CLS features are checked."""
        if cond.ndim == 4:
            return self.condition(cond)
        want = "tokens (B, T_c, D)" if self.cross else "global features (B, D)"
        if cond.ndim != (3 if self.cross else 2) or cond.shape[-1] != self.config.cond_dim:
            raise ValueError(f"cond must be images (B, 3, H, W) or {want} with D={self.config.cond_dim} for "
                             f"{self.config.conditioning} conditioning, got shape {tuple(cond.shape)}")
        return cond

    def drop_condition(self, cond, generator=None):
        """Replace each example's condition by the learned null with probability p_uncond (CFG training)."""
        keep = torch.rand(cond.shape[0], generator=generator, device=cond.device) >= self.p_uncond  # (B,)
        keep = keep.view(-1, *(1,) * (cond.ndim - 1))
        return torch.where(keep, cond, self.null_cond.to(cond.dtype))

    # -- training
    def loss(self, target_images, cond, generator=None):
        """eps-space diffusion loss (§6.1) of target images (B, 3, S, S) in [-1, 1] given cond images or tensors."""
        cond = self.drop_condition(self._as_cond(cond), generator)
        return diffusion.diffusion_loss(lambda z_t, t: self.net(z_t, t, cond), target_images, generator=generator)

    def forward(self, target_images, cond, generator=None):
        """The training loss; what DDP / FSDP wrap."""
        return self.loss(target_images, cond, generator)

    # -- sampling
    @torch.no_grad()
    def sample(self, cond_images=None, num_samples=1, steps=256, guidance=diffusion.GUIDANCE, gamma=diffusion.GAMMA,
               generator=None, cond=None, progress=False):
        """num_samples variations of each conditioning image -> (B, num_samples, 3, S, S) in [-1, 1].

        DDPM with 256 steps, interpolation gamma 0.2 and guidance w 0.5 (§6.1). Pass `cond` (tokens or
        CLS features) instead of images to skip the encoder. Runs in eval mode (no dropout).
        """
        cond = self._as_cond(cond_images if cond is None else cond)
        b, size = cond.shape[0], self.config.image_size
        cond = cond.repeat_interleave(num_samples, dim=0)                      # (B n, ...)
        both = torch.cat([cond, self.null_cond.to(cond.dtype).expand_as(cond)])  # (2 B n, ...): cond, then null

        def v_fn(z_t, t):
            if guidance == 0:                                                  # w = 0: the null pass is unused
                return self.net(z_t, t, cond)
            v_cond, v_null = self.net(torch.cat([z_t, z_t]), torch.cat([t, t]), both).chunk(2)
            return diffusion.guided(v_cond, v_null, guidance)

        was_training = self.training
        self.eval()
        noise = torch.randn(cond.shape[0], 3, size, size, generator=generator, device=cond.device)
        x = diffusion.ddpm_sample(v_fn, noise, steps, gamma=gamma, generator=generator, progress=progress)
        self.train(was_training)
        return x.view(b, num_samples, 3, size, size)

    # -- checkpoints: the config inside, the encoder by reference
    def save(self, path, **extra):
        """torch.save {"config", "model", "p_uncond", "encoder_spec", **extra}; never the encoder weights."""
        torch.save({"config": dataclasses.asdict(self.config), "model": self.state_dict(),
                    "p_uncond": self.p_uncond, "encoder_spec": self.encoder_spec, **extra}, path)

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu", encoder=None, key="model"):
        """Rebuild from `save`: the config from the file, the encoder from its spec unless one is given.

        key="ema" loads an EMA state dict stored by the caller as save(path, ema=ema.state_dict()).
        """
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:  # truncated / not a torch file
            raise ValueError(f"{path}: cannot read the checkpoint ({e})") from e
        if not isinstance(ckpt, dict) or "config" not in ckpt or key not in ckpt:
            found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
            raise ValueError(f"{path}: not a Semantica checkpoint (needs 'config' and {key!r}; found {found})")
        try:
            config = UViTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items()})
        except TypeError as e:
            raise ValueError(f"{path}: stored config does not fit UViTConfig ({e})") from e
        spec = ckpt.get("encoder_spec")
        if encoder is None and spec is not None:
            import encoders  # only needed when the encoder is rebuilt from its name / weight file
            encoder = encoders.load_encoder(spec["name"], weights=spec["weights"])
        elif encoder is not None:
            spec = None      # derived from the given encoder
        model = cls(config, encoder=encoder, p_uncond=ckpt.get("p_uncond", P_UNCOND), encoder_spec=spec)
        try:
            model.load_state_dict(ckpt[key])
        except RuntimeError as e:
            raise ValueError(f"{path}: the weights under {key!r} do not match the stored config {config}:\n{e}") from e
        return model.to(map_location) if isinstance(map_location, (str, torch.device)) else model
