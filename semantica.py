"""Semantica: a frozen image encoder conditions a U-ViT diffusion decoder that generates variations.

Semantica (arXiv 2405.14857v3): §3.2 frozen encoder, §3.3 diffusion decoder (uvit.py), §3.4
conditioning (encoder tokens by cross-attention, or the CLS token by FiLM), §6.1 training and
sampling settings (v-prediction with the eps-space loss, DDPM sampler, guidance 0.5, Polyak
averaging). The diffusion math lives in diffusion.py and the network in uvit.py; this file joins them:

    cond image --encoder.preprocess--> frozen encoder (no grad) --> tokens (B, T_c, D) | CLS (B, D)
      --condition dropout (p_uncond, to a learned null)--> UViT(z_t, t, cond) -> v --> diffusion_loss

Classifier-free guidance (Ho & Salimans 2022): training replaces the condition by a learned null with
probability p_uncond; sampling runs the conditional and null passes as one batch and combines them as
(1 + w) v_cond - w v_null in float32 (w = 0: purely conditional).

It also holds the one checkpoint format of the project (`checkpoint_header`, `save_checkpoint`; the
frozen encoder is stored by identity: name, config, weight-file sha256, or a random init's full state)
and its one loader:

    model = Semantica.from_checkpoint("runs/tiny/ckpt.pt")          # EMA weights, eval mode
    x = model.sample([Image.open("a.png")], num_samples=4, seed=0)  # (1, 4, 3, S, S) in [-1, 1]

Shapes: B batch, n samples per condition, S image side, T_c encoder tokens, D encoder width.
Precomputed encoder features (§3.2: "we can precompute representations") go to loss/sample as `cond`.
"""
import copy
import dataclasses
import hashlib
import math
import os
import warnings

import numpy as np
import torch
from torch import nn

import diffusion
import encoders
from pages import images
from uvit import UViT, UViTConfig

P_UNCOND = 0.1  # INTERPRETATION: the paper does not state its condition-dropout rate; 0.1 as in Google's
#                 ddpm_w_distillation configs (uncond_prob) and Ho & Salimans (arXiv 2207.12598)
DDPM_STEPS = 256  # DESIGN: the paper names the DDPM sampler (§3.1, §6.1) but gives no step count N
EMA_YOUNG = 0.25  # DESIGN: warn when the EMA still holds more than this fraction of its initial weights
#                   (decay^step; ~1/(1 - decay) steps, where decay^step = 1/e)
FORMAT = "semantica-ckpt/2"
MAX_SEED = 2 ** 63 - 1  # DESIGN: the largest run seed (train.py --seed, claims.py --train-seeds): torch.manual_seed
#                         and numpy SeedSequence take it, and seed + rank, as a 64-bit integer


class Semantica(nn.Module):
    """Frozen encoder + trainable U-ViT (`.net`) + learned null condition (`.null_cond`).

    The frozen encoder is held in a one-element tuple, `self._frozen = (encoder,)`. nn.Module registers
    only modules, parameters and buffers assigned as attributes, so a tuple is invisible to it: the
    encoder is never in parameters(), state_dict(), train()/eval(), the optimiser or the checkpoint (the
    checkpoint stores its identity instead, see `encoder_identity`). Two consequences, handled in plain code:
    - `to(...)` is extended to move the encoder as well (`.cuda()`, `.half()` and friends do not move it);
    - `ema_copy()` makes the EMA with `copy.deepcopy(self, memo)` where memo maps the encoder to itself,
      so the copy shares the one encoder (a bare deepcopy would duplicate it: correct, twice the memory).
    """

    def __init__(self, config: UViTConfig, encoder=None, p_uncond=P_UNCOND):
        super().__init__()
        width = None if encoder is None else cond_width(encoder, config.conditioning)
        if encoder is not None and width != config.cond_dim:
            raise ValueError(f"encoder {encoder.name} gives {width}-dim features but the U-ViT expects "
                             f"cond_dim={config.cond_dim}; use dataclasses.replace(config, cond_dim={width})")
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
        self.config, self.p_uncond = config, p_uncond
        self.net = UViT(config)
        self.cross = config.conditioning == "cross_attention"
        # DESIGN: one learned null token (broadcast over the T_c tokens) or one null CLS vector
        # (as lucidrains/imagen-pytorch imagen_pytorch.py null_text_embed); it passes through the same norm + projection as real conditions.
        self.null_cond = nn.Parameter(0.02 * torch.randn((1, 1, config.cond_dim) if self.cross else (1, config.cond_dim)))
        if encoder is not None:
            encoder.eval().requires_grad_(False)
        self._frozen = (encoder,)                 # a tuple: not registered by nn.Module (class docstring)
        self.checkpoint_step = None               # set by from_checkpoint

    @property
    def encoder(self):
        """The frozen encoder (encoders.VisionEncoder) or None when conditions are given as tensors."""
        return self._frozen[0]

    def to(self, *args, **kwargs):
        """nn.Module.to, and the frozen encoder follows (it is not a submodule)."""
        if self.encoder is not None:
            self.encoder.to(*args, **kwargs)
        return super().to(*args, **kwargs)

    def ema_copy(self):
        """A frozen copy for Polyak averaging (§6.1) that shares, not copies, the frozen encoder."""
        shared = {id(self.encoder): self.encoder}  # deepcopy's memo: "already copied" -> reused as is
        return copy.deepcopy(self, shared).eval().requires_grad_(False)

    # -- conditioning
    @torch.no_grad()
    def condition(self, images):
        """Float images in [-1, 1] (B, 3, H, W) -> tokens (B, T_c, D) for cross-attention or CLS (B, D) for FiLM.

        Training (loss) and sampling condition through here, and the feature cache (pages/embeddings.py) calls
        the same encoder forward, which runs in float32 outside autocast (encoders.VisionEncoder.forward): a
        bf16-autocast training step conditions on the same features as sampling and the cache."""
        if self.encoder is None:
            raise ValueError("this Semantica has no encoder: pass precomputed cond tensors, or build it "
                             "with encoder=encoders.load_encoder(...)")
        global_feature, tokens = self.encoder(self.encoder.preprocess(images))  # §3.4
        return tokens if self.cross else global_feature

    def as_cond(self, cond):
        """Images (B, 3, H, W) go through the encoder; precomputed tokens / CLS features are checked."""
        if cond.ndim == 4:
            return self.condition(cond)
        want = "tokens (B, T_c, D)" if self.cross else "global features (B, D)"
        if cond.ndim != (3 if self.cross else 2) or cond.shape[-1] != self.config.cond_dim:
            raise ValueError(f"cond must be images (B, 3, H, W) or {want} with D={self.config.cond_dim} for "
                             f"{self.config.conditioning} conditioning, got shape {tuple(cond.shape)}")
        return cond

    def drop_condition(self, cond, generator=None):
        """Replace each example's condition by the learned null with probability p_uncond (CFG training).

        torch.where on a per-example mask (static shapes, XLA-friendly); a dropped row equals null_cond exactly.
        """
        keep = torch.rand(cond.shape[0], generator=generator, device=cond.device) >= self.p_uncond  # (B,)
        keep = keep.view(-1, *(1,) * (cond.ndim - 1))
        return torch.where(keep, cond, self.null_cond.to(cond.dtype))

    # -- training
    def loss(self, target_images, cond, generator=None, t=None, eps=None, sigmoid_bias=None):
        """eps-space diffusion loss (§3.1, §6.1) of targets (B, 3, S, S) in [-1, 1] given cond images or tensors.

        The condition is dropped to the null first (p_uncond), then diffusion.diffusion_loss draws t and eps
        from `generator` unless given; sigmoid_bias: its toy-preset loss weighting (None: the paper's loss).
        """
        cond = self.drop_condition(self.as_cond(cond), generator)
        return diffusion.diffusion_loss(lambda z_t, t_: self.net(z_t, t_, cond), target_images, t=t, eps=eps,
                                        generator=generator, sigmoid_bias=sigmoid_bias)

    def forward(self, target_images, cond, generator=None, sigmoid_bias=None):
        """The training loss; what DDP / FSDP wrap."""
        return self.loss(target_images, cond, generator, sigmoid_bias=sigmoid_bias)

    # -- sampling
    def as_images(self, pictures):
        """images.image_batch (PIL of any mode, numpy uint8 HWC, uint8 or [-1, 1] float tensors; PIL and numpy
        centre-cropped and resized to the model's resolution as in training) -> float (B, 3, H, W) in [-1, 1]
        on the model's device. ValueError (one line) for any other input."""
        return images.image_batch(pictures, self.config.image_size, "cond_images").to(self.null_cond.device)

    @torch.no_grad()
    def sample(self, cond_images=None, num_samples=1, steps=DDPM_STEPS, guidance=diffusion.GUIDANCE,
               gamma=diffusion.GAMMA, seed=None, cond=None, progress=False, first_index=0, first_sample=0,
               on_step=None):
        """num_samples variations of each conditioning image -> float32 (B, num_samples, 3, S, S) in [-1, 1].

        cond_images: one image, a batch or a list of images (images.image_batch): PIL images of any mode and
        numpy uint8 HWC arrays (0..255), both centre-cropped and resized to S; tensors (3, H, W) / (B, 3, H, W),
        uint8 in 0..255 or float in [-1, 1] (a float batch with no value below 0, i.e. [0, 1] images, is
        refused); or give `cond`: encoder tokens (B, T_c, D) or CLS features (B, D), which skip the encoder, or
        a float image batch (B, 3, S, S) in [-1, 1] taken as given (the project's own loaders and grids, whose
        range is known: a truly bright image is not mistaken for a [0, 1] one).
        Sampler: DDPM (§3.1) with `steps` steps (DESIGN: 256, the paper gives no count), variance
        interpolation gamma 0.2 (§6.1) and guidance w (§6.1: 0.5), (1 + w) v_cond - w v_null with the
        learned null (w = 0: purely conditional, no null pass). The network may run under bf16 autocast;
        its outputs are cast to float32 before guidance and every sampler update is float32.
        Noise: seed=None (default) draws fresh noise at every call: the seed is drawn from torch's default
        generator (torch.manual_seed governs it), so successive calls, e.g. one per image, never share noise.
        With an explicit seed, sample j of row b uses its own generator seeded from (seed, first_index + b,
        first_sample + j) (numpy SeedSequence), for its initial noise and every step's noise, so an image's
        variations do not depend on the other images of the batch, nor on how its samples are split across
        calls (first_index / first_sample give a call's place), and the same noise is used for every guidance
        value (columns of a guidance sweep differ only in w).
        On a device without torch.Generator (torch_xla) the generators live on CPU and the noise is moved.
        on_step: called after every DDPM step (diffusion.ddpm_sample; train.py passes torch_xla.sync).
        Raises ValueError for steps / num_samples < 1, non-finite guidance or gamma, negative seed or indices.
        """
        _check_sampling(steps, num_samples, guidance, gamma, seed, first_index, first_sample)
        if seed is None:
            seed = int(torch.randint(0, MAX_SEED, ()))
        if cond is None:
            if cond_images is None:
                raise ValueError("give cond_images (tensors or PIL images) or cond (encoder features)")
            cond_images = self.as_images(cond_images)
        cond = self.as_cond(cond_images if cond is None else cond)
        b, size, device = cond.shape[0], self.config.image_size, cond.device
        cond = cond.repeat_interleave(num_samples, dim=0)                         # (B n, ...)
        null = self.null_cond.to(cond.dtype).expand_as(cond)
        both = torch.cat([cond, null])                                            # (2 B n, ...): cond, then null

        def v_fn(z_t, t):
            if guidance == 0:                                                     # w = 0: the null pass is unused
                return self.net(z_t, t, cond).float()
            v_cond, v_null = self.net(torch.cat([z_t, z_t]), torch.cat([t, t]), both).float().chunk(2)
            return diffusion.guided(v_cond, v_null, guidance)                     # float32, also under autocast

        # DESIGN: torch_xla has no torch.Generator ("XLA device type not an accelerator"): CPU streams there
        gen_device = torch.device("cpu") if device.type == "xla" else device
        generators = [sample_generator(seed, first_index + i, first_sample + j, gen_device)
                      for i in range(b) for j in range(num_samples)]
        noise = torch.stack([torch.randn(3, size, size, generator=g, device=gen_device, dtype=torch.float32)
                             for g in generators]).to(device)
        was_training = self.training
        self.eval()
        try:
            x = diffusion.ddpm_sample(v_fn, noise, steps, gamma=gamma, generator=generators, progress=progress,
                                      on_step=on_step)
        finally:
            self.train(was_training)
        return x.view(b, num_samples, 3, size, size)

    # -- the one loader
    @classmethod
    def from_checkpoint(cls, path, ema=True, device="cpu", encoder=None, encoder_weights=None):
        """Rebuild the model that train.py saved in `path` (format FORMAT, see `checkpoint_header`), in eval mode.

        ema: load the Polyak-averaged weights (default, §6.1) or the raw ones. The encoder is rebuilt from the
        stored identity (`build_encoder`; `encoder_weights` points to its file when it moved), or `encoder` is
        given and must be the one the model was trained with. "module." / "_orig_mod." key prefixes (a
        wrapped or compiled model's state dict) are stripped by encoders.strip_prefixes, the rule of every file.
        Warns when the EMA is young (EMA_YOUNG).
        Raises ValueError (one line, the file untouched) for an unreadable file, another format, weights that
        do not fit the stored config, or an encoder mismatch; FileNotFoundError when `path` does not exist.
        """
        ckpt = read_checkpoint(path)
        key = "ema" if ema else "model"
        if ckpt.get(key) is None:
            raise ValueError(f"{path}: the checkpoint holds no {key!r} weights")
        try:
            config = UViTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["model_config"].items()})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: the stored model_config does not fit UViTConfig ({e})") from e
        identity = ckpt["encoder"]
        if encoder is None and identity is not None:
            encoder = build_encoder(identity, weights=encoder_weights)
        elif encoder is not None:
            check_encoder(identity, encoder)
        model = cls(config, encoder=encoder, p_uncond=ckpt["p_uncond"])
        state = {encoders.strip_prefixes(k): v for k, v in ckpt[key].items()}
        missing, unexpected = model.state_dict().keys() - state.keys(), state.keys() - model.state_dict().keys()
        if missing or unexpected:
            raise ValueError(f"{path}: {key!r} weights do not fit the stored config: missing {sorted(missing)[:4]}, "
                             f"unexpected {sorted(unexpected)[:4]}")
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1].strip()
            raise ValueError(f"{path}: {key!r} weights do not fit the stored config: {first}") from e
        model.checkpoint_step = ckpt["step"]
        decay = ckpt.get("ema_decay")
        if ema and decay is not None and decay ** ckpt["step"] > EMA_YOUNG:
            warnings.warn(f"{path}: EMA at step {ckpt['step']} with decay {decay} still holds "
                          f"{100 * decay ** ckpt['step']:.0f}% of the initial weights; its samples may be noise "
                          f"(load the raw weights with ema=False / --no-ema, or train longer)", stacklevel=2)
        return model.to(device).eval()


def cond_width(encoder, conditioning):
    """The U-ViT's cond_dim for this encoder: the token width D for cross-attention (§3.4), the global
    feature width for FiLM (App. D; CLIP's projected global is narrower than its tokens: `embed_dim`)."""
    return encoder.dim if conditioning == "cross_attention" else getattr(encoder, "embed_dim", encoder.dim)


def _check_sampling(steps, num_samples, guidance, gamma, seed, first_index, first_sample):
    """One-line ValueErrors for sampler arguments that cannot be computed with."""
    for name, v, low in (("steps", steps, 1), ("num_samples", num_samples, 1), ("seed", 0 if seed is None else seed, 0),
                         ("first_index", first_index, 0), ("first_sample", first_sample, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    for name, v in (("guidance", guidance), ("gamma", gamma)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")


def sample_generator(seed, image_index, sample_index, device="cpu"):
    """The torch.Generator of one (image, sample) pair: seeded from SeedSequence(seed, spawn_key=(image,
    sample)), so every pair has its own stream whatever else is sampled with it."""
    word = np.random.SeedSequence(seed, spawn_key=(image_index, sample_index)).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(word) >> 1)  # 63 bits: a valid seed on every backend


@torch.no_grad()
def update_ema(ema, model, decay):
    """Polyak averaging (§6.1, decay 0.9999): ema <- decay * ema + (1 - decay) * model; buffers copied."""
    # One fused multi-tensor op instead of a Python loop of ~800 lerp_ launches (sid-b-256).
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


# ----------------------------------------------------------------------------- checkpoints
# A checkpoint (train.py's OUT/ckpt.pt) is one dict: checkpoint_header(model) (format, model_config,
# p_uncond, encoder identity) + "model" and "ema" (Semantica state dicts: net.*, null_cond), "step",
# "ema_decay", and train.py's own keys (train_config, optimiser, data position, ...), ignored here.

def checkpoint_header(model):
    """The keys that describe the model: {"format", "model_config", "p_uncond", "encoder"}.

    Computing the encoder identity hashes its weights file: build the header once per run, not per save.
    """
    encoder = model.encoder
    return {"format": FORMAT, "model_config": dataclasses.asdict(model.config), "p_uncond": model.p_uncond,
            "encoder": None if encoder is None else encoder_identity(encoder)}


def save_checkpoint(path, payload):
    """torch.save(payload) atomically: a temporary file in the same folder, flushed, then os.replace, so a
    crash mid-write leaves the previous checkpoint intact. Refuses nothing (the caller builds the payload)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_checkpoint(path):
    """torch.load (CPU, weights_only) of a FORMAT checkpoint; ValueError (one line) for anything else."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, objects other than tensors, a truncated zip, an unreadable file
        raise ValueError(f"{path}: cannot read the checkpoint ({encoders.load_failure(e)}; train.py writes "
                         f"{FORMAT} checkpoints)") from e
    found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
    if found != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} checkpoint (format {found!r}); train.py writes this format")
    missing = sorted({"model_config", "p_uncond", "encoder", "step"} - ckpt.keys())
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {missing}")
    return ckpt


# ----------------------------------------------------------------------------- encoder identity

WEIGHT_FILES = (".safetensors", ".bin", ".pth", ".pt", "config.json")  # what a model folder's hash covers


def file_sha256(path):
    """sha256 of a weights file, or of a model folder (e.g. Hugging Face's): the names and contents of its
    weight and config files (WEIGHT_FILES; READMEs, tokenizers and other extras do not count)."""
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(WEIGHT_FILES))
    for file in files:
        if file != path:
            h.update(os.path.relpath(file, path).encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def encoder_identity(encoder):
    """What a checkpoint stores about its frozen encoder: {"name", "config", "weights", "sha256", "seed"} and,
    for a random init (no weights file), "state" (its full state dict: it comes back exactly, whatever seed)."""
    identity = _identity_fields(encoder)
    if encoder.weights is None:
        identity["state"] = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
    return identity


def _identity_fields(encoder):
    weights = encoder.weights
    return {"name": encoder.name, "config": dataclasses.asdict(encoder.config), "weights": weights,
            "sha256": file_sha256(weights) if weights is not None and os.path.exists(weights) else None,
            "seed": getattr(encoder, "seed", None)}


def describe_encoder(identity):
    """One-line name of an identity, for messages: "dinov2-b14 (weights x.pth, sha256 1a2b3c4d5e6f)"."""
    if identity is None:
        return "no encoder (precomputed conditions)"
    if identity["weights"] is None:
        return f"{identity['name']} (random init, seed {identity['seed']})"
    sha = identity["sha256"][:12] if identity["sha256"] else "not hashed"
    return f"{identity['name']} (weights {identity['weights']}, sha256 {sha})"


def check_encoder(identity, encoder):
    """Refuse (one-line ValueError naming both) an encoder that is not the one `identity` describes:
    same name and config, and the same weights (file hash, or the stored state of a random init)."""
    given = None if encoder is None else _identity_fields(encoder)
    same = identity is None and given is None
    if identity is not None and given is not None and identity["name"] == given["name"] \
            and identity["config"] == given["config"]:
        if identity["weights"] is None:   # random init: its stored state is its identity
            state = encoder.state_dict()
            same = given["weights"] is None and state.keys() == identity["state"].keys() and all(
                torch.equal(state[k].cpu(), v) for k, v in identity["state"].items())
        else:
            same = given["sha256"] is not None and given["sha256"] == identity["sha256"]
    if not same:
        raise ValueError(f"encoder mismatch: the checkpoint was trained with {describe_encoder(identity)}, "
                         f"got {describe_encoder(given)}")


def build_encoder(identity, weights=None):
    """Rebuild the frozen encoder a checkpoint describes: a random init from its stored state, or the preset
    loaded from its weights file (`weights` overrides the stored path, e.g. after moving the file).
    Raises ValueError (one line) when the file is missing or is not the one the checkpoint was trained with."""
    name = identity["name"]
    if identity["weights"] is None and weights is None:
        if name not in encoders.ENCODER_PRESETS:
            raise ValueError(f"encoder {name!r} is not a preset of this version of encoders.py")
        encoder = encoders.load_encoder(name, seed=identity["seed"] or 0)
        encoder.load_state_dict(identity["state"])
        encoder.seed = identity["seed"]
    else:
        file = weights or identity["weights"]
        if not os.path.exists(file):
            raise ValueError(f"the checkpoint's encoder {describe_encoder(identity)} needs its weights file, "
                             f"which is not at {file}; pass its path (encoder_weights= / --encoder-weights)")
        encoder = encoders.load_encoder(name, weights=file, act=identity["config"].get("act"))
    check_encoder(identity, encoder)
    return encoder
