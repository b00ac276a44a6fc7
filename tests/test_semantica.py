"""semantica.py: frozen encoder outside the module tree, condition dropout (§6.1 CFG training), the eps-space
loss, guidance direction / null pass / w = 0 (Ho & Salimans), float32 guidance under bf16 autocast, noise that
does not depend on the batch, argument checks, the EMA, and the one checkpoint format and loader.

Expected values are computed here independently: binomial bounds, the closed-form schedule (§3.1, §6.1),
stub networks whose conditional and null outputs are known, hand-written float32 combinations."""
import argparse
import copy
import dataclasses
import hashlib
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import encoders
import uvit
from semantica import (FORMAT, Semantica, build_encoder, check_encoder, checkpoint_header, save_checkpoint,
                       update_ema)
from test_uvit import randomize  # random weights everywhere (zero-init outputs would hide dependencies)

# 16 px target images, one conv level and a 2-block cross-attention transformer at 8x8; the "tiny"
# DINOv2-architecture encoder (random weights, 128-dim, 65 tokens) provides the condition.
MICRO = uvit.UViTConfig(image_size=16, channels=(16,), blocks=(1,), transformer_levels=0, width=32, depth=2,
                        head_dim=16, cond_dim=128, dropout=0.0)


@pytest.fixture(scope="module")
def encoder():
    return encoders.load_encoder("tiny")


def images(b, size, seed):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def closed_form_alpha_sigma(t, image_size, noise_size=32):
    """The §3.1 / §6.1 schedule in float64: clipped cosine in log-SNR (±15), shifted by 2 ln(noise/image)."""
    t_min, t_max = math.atan(math.exp(-7.5)), math.atan(math.exp(7.5))
    lam = -2 * np.log(np.tan(t_min + np.asarray(t, np.float64) * (t_max - t_min))) + 2 * math.log(noise_size / image_size)
    return np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))


# ----------------------------------------------------------------------------- the frozen encoder

def test_encoder_is_frozen_and_outside_the_module_tree(encoder):
    model = Semantica(MICRO, encoder)
    enc_params = {id(p) for p in encoder.parameters()}
    assert not enc_params & {id(p) for p in model.parameters()}                # not in the optimiser / EMA
    assert set(model.state_dict()) == {"null_cond"} | {"net." + k for k in model.net.state_dict()}
    model.train()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    ema = model.ema_copy()                                                      # the EMA shares the encoder
    assert ema.encoder is encoder and ema.net is not model.net and not ema.training
    assert all(not p.requires_grad for p in ema.parameters())
    assert copy.deepcopy(model).encoder is not encoder                          # a bare deepcopy duplicates it
    model.to(torch.float64)                                                     # .to() moves the encoder too
    assert next(encoder.parameters()).dtype == torch.float64
    model.to(torch.float32)
    assert next(encoder.parameters()).dtype == torch.float32


def test_encoder_width_mismatch_is_an_error(encoder):
    with pytest.raises(ValueError, match="cond_dim"):
        Semantica(dataclasses.replace(MICRO, cond_dim=64), encoder)


def test_condition_uses_tokens_or_global_feature(encoder):
    x = images(2, 48, seed=1)                   # any size: the encoder's own preprocessing resizes
    tokens = Semantica(MICRO, encoder).condition(x)
    cls = Semantica(dataclasses.replace(MICRO, conditioning="film"), encoder).condition(x)
    assert tokens.shape == (2, encoder.num_tokens, 128) and cls.shape == (2, 128)
    assert torch.allclose(tokens[:, 0], cls)    # DINOv2: the global feature is the normed CLS token
    with pytest.raises(ValueError, match="tokens"):
        Semantica(MICRO, encoder).loss(images(2, 16, 0), cls)


# ----------------------------------------------------------------------------- training: dropout and loss

@pytest.mark.parametrize("p_uncond", [0.0, 0.1, 0.5, 1.0])
def test_condition_dropout_rate_within_binomial_bounds(p_uncond):
    model = Semantica(MICRO, p_uncond=p_uncond)
    n = 20_000
    cond = torch.randn(n, 3, 128)
    out = model.drop_condition(cond, generator=torch.Generator().manual_seed(0))
    is_null = (out == model.null_cond).all(dim=(1, 2))     # a dropped row equals the learned null exactly
    is_cond = (out == cond).all(dim=(1, 2))
    assert torch.all(is_null ^ is_cond)                   # each example keeps its condition or gets the whole null
    rate = is_null.float().mean().item()
    assert abs(rate - p_uncond) <= 5 * math.sqrt(p_uncond * (1 - p_uncond) / n)  # 5 sigma; exact at p = 0, 1


@pytest.mark.parametrize("conditioning", ["cross_attention", "film"])
def test_loss_is_the_eps_space_loss_of_the_conditioned_network(conditioning):
    cfg = dataclasses.replace(MICRO, conditioning=conditioning)
    g = torch.Generator().manual_seed(0)
    x = images(4, 16, seed=3).clamp(-0.9, 0.9)
    t = torch.tensor([0.05, 0.3, 0.6, 0.95])
    eps = torch.randn(4, 3, 16, 16, generator=g)
    cond = torch.randn((4, 5, 128) if conditioning == "cross_attention" else (4, 128), generator=g)
    for p_uncond in (0.0, 1.0):                                   # all conditional / all null
        model = randomize(Semantica(cfg, p_uncond=p_uncond), seed=4).eval()
        alpha, sigma = (torch.from_numpy(a).view(-1, 1, 1, 1) for a in closed_form_alpha_sigma(t, 16))
        z = alpha * x.double() + sigma * eps.double()            # Eq. 1
        seen = cond if p_uncond == 0 else model.null_cond.expand_as(cond)
        with torch.no_grad():
            v = model.net(z.float(), t, seen).double()
        expected = ((eps.double() - (sigma * z + alpha * v)) ** 2).mean().item()   # eps-hat = sigma z + alpha v
        with torch.no_grad():
            got = model.loss(x, cond, generator=torch.Generator().manual_seed(1), t=t, eps=eps).item()
        assert got == pytest.approx(expected, rel=1e-4), p_uncond
        v_loss = ((alpha * eps.double() - sigma * x.double() - v) ** 2).mean().item()
        assert abs(v_loss - expected) > 1e-2 * expected            # the v-space loss is a different number


def test_gradients_reach_every_trainable_parameter_and_never_the_encoder(encoder):
    for conditioning in ("cross_attention", "film"):
        model = randomize(Semantica(dataclasses.replace(MICRO, conditioning=conditioning), encoder, p_uncond=0.5))
        model.loss(images(8, 16, 0), images(8, 32, 1), generator=torch.Generator().manual_seed(0)).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert all(p.grad is None for p in encoder.parameters())


def test_update_ema_is_polyak_averaging():
    model, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    model.register_buffer("count", torch.tensor(5.0))
    ema.register_buffer("count", torch.tensor(0.0))
    before = [p.detach().clone() for p in ema.parameters()]
    update_ema(ema, model, 0.9)
    for e, e0, p in zip(ema.parameters(), before, model.parameters()):
        assert torch.allclose(e, 0.9 * e0 + 0.1 * p, atol=1e-7)   # decay * ema + (1 - decay) * model
    assert ema.count.item() == 5.0                                 # buffers copied


@pytest.mark.slow  # ~20 s on one CPU core
def test_overfits_one_pair(encoder):
    import diffusion
    torch.manual_seed(0)
    model = Semantica(MICRO, encoder, p_uncond=0.0)
    target = images(1, 16, seed=2).clamp(-0.8, 0.8).expand(16, -1, -1, -1)
    cond = model.condition(images(1, 32, seed=3)).expand(16, -1, -1)
    g = torch.Generator().manual_seed(0)
    t_eval = (torch.arange(16) + 0.5) / 16                     # fixed t grid and noise for the evaluation
    eps_eval = torch.randn(target.shape, generator=g)

    def eval_loss():
        with torch.no_grad():
            return diffusion.diffusion_loss(lambda z, t: model.net(z, t, cond), target, t=t_eval, eps=eps_eval).item()

    before, steps = eval_loss(), 300
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)  # linear decay to 0
    for _ in range(steps):
        opt.zero_grad()
        model.loss(target, cond, generator=g).backward()
        opt.step()
        decay.step()
    assert eval_loss() < before / 10                          # measured: ~16x


# ----------------------------------------------------------------------------- sampling: guidance

class ConstantV(nn.Module):
    """Stub network: v = the first entry of the condition, everywhere; records its inputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, z_t, t, cond):
        self.calls.append((z_t.clone(), cond.shape[0]))
        c = cond[:, 0, 0] if cond.ndim == 3 else cond[:, 0]
        return c.view(-1, 1, 1, 1).expand_as(z_t).clone()


@pytest.mark.parametrize("w, v_guided", [(0.5, 1.5 * 0.2 - 0.5 * -0.4), (1.5, 2.5 * 0.2 - 1.5 * -0.4), (0.0, 0.2)])
def test_guidance_direction_learned_null_and_w0(w, v_guided):
    """v_cond = 0.2 (the real condition), v_null = -0.4 (the learned null): a one-step sample is
    x = clip(alpha_1 z - sigma_1 v~) with v~ = (1 + w) v_cond - w v_null. Swapped arguments give
    (1 + w)(-0.4) - w 0.2, a null half fed the real condition 0.2, a zero null (1 + w) 0.2: all fail."""
    model = Semantica(MICRO)
    model.net = ConstantV()
    with torch.no_grad():
        model.null_cond.fill_(-0.4)
    x = model.sample(cond=torch.full((2, 5, 128), 0.2), num_samples=3, steps=1, guidance=w, seed=0)
    (z, batch), = model.net.calls
    assert batch == (6 if w == 0 else 12)                      # w = 0: no null pass; else [cond; null] at once
    alpha, sigma = closed_form_alpha_sigma(1.0, 16)
    expected = np.clip(alpha * z[:6].double().numpy() - sigma * v_guided, -1, 1)
    np.testing.assert_allclose(x.reshape(6, 3, 16, 16).double().numpy(), expected, atol=1e-5)


def test_sample_batches_conditional_and_null_passes(encoder):
    model = randomize(Semantica(MICRO, encoder), seed=1)
    batches = []
    model.net.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    cond_images = images(2, 32, seed=4)
    x = model.sample(cond_images, num_samples=3, steps=4, guidance=0.5, seed=0)
    assert x.shape == (2, 3, 3, 16, 16) and x.abs().max() <= 1.0
    assert batches == [2 * 2 * 3] * 4                          # one network call per step on [cond; null]
    assert torch.equal(x, model.sample(cond_images, num_samples=3, steps=4, guidance=0.5, seed=0))  # seeded
    assert not torch.equal(x, model.sample(cond_images, num_samples=3, steps=4, guidance=0.5, seed=1))
    assert model.training                                     # sampling restores the mode


def test_guidance_and_sampler_updates_are_float32_under_bf16_autocast():
    """The network runs in bf16; guidance must combine its outputs in float32."""
    model = randomize(Semantica(MICRO), seed=2)
    seen = []
    model.net.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    cond, w = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(5)), 1.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = model.sample(cond=cond, num_samples=2, steps=3, guidance=w, seed=0)
    assert x.dtype == torch.float32 and all(z.dtype == torch.float32 for z, _ in seen)   # sampler state
    z, v = seen[-1]                                             # the last step: x = clip(alpha z - sigma v~)
    assert v.dtype == torch.bfloat16                            # the network really ran in bf16
    v_cond, v_null = v.float().chunk(2)
    alpha, sigma = (float(a) for a in closed_form_alpha_sigma(1 / 3, 16))
    hand = (alpha * z[:4].double() - sigma * ((1 + w) * v_cond - w * v_null).double()).clamp(-1, 1)
    assert torch.allclose(x.reshape(4, 3, 16, 16).double(), hand, atol=1e-5)
    in_bf16 = (alpha * z[:4].double() - sigma * ((1 + w) * v.chunk(2)[0] - w * v.chunk(2)[1]).double()).clamp(-1, 1)
    assert (in_bf16 - hand).abs().max() > 1e-4                  # a bf16 combination would be caught


def test_variations_do_not_depend_on_batch_composition(encoder):
    model = randomize(Semantica(MICRO, encoder), seed=3)
    abc = images(3, 32, seed=6)
    kw = dict(steps=3, guidance=0.5, seed=7)
    together = model.sample(abc, num_samples=2, **kw)
    alone = [model.sample(abc[i:i + 1], num_samples=2, first_index=i, **kw) for i in range(3)]
    assert torch.allclose(torch.cat(alone), together, atol=1e-5)
    split = model.sample(abc[1:], num_samples=2, first_index=1, **kw)                # any split of the images
    assert torch.allclose(split, together[1:], atol=1e-5)
    one = model.sample(abc[2:], num_samples=1, first_index=2, first_sample=1, **kw)  # samples split across calls
    assert torch.allclose(one[0, 0], together[2, 1], atol=1e-5)
    assert not torch.allclose(together[:, 0], together[:, 1])                       # samples differ


def test_sample_accepts_pil_images(encoder):
    model = randomize(Semantica(MICRO, encoder), seed=4)
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    as_tensor = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1    # [0, 255] -> [-1, 1]
    kw = dict(num_samples=1, steps=2, seed=0)
    assert torch.allclose(model.sample([Image.fromarray(pixels)], **kw), model.sample(as_tensor[None], **kw))
    big = Image.fromarray(np.zeros((40, 64, 3), np.uint8)).convert("L")                 # resized, made RGB
    assert model.sample([big, Image.fromarray(pixels)], **kw).shape == (2, 1, 3, 16, 16)


def test_default_calls_draw_fresh_noise_governed_by_torch_manual_seed():
    """seed=None (default): each call draws new noise from torch's generator, so images sampled one call each
    share no noise (the old seed=0 default gave every call the same); torch.manual_seed reproduces a call;
    an explicit seed keeps its documented per-(image, sample) streams: SeedSequence(seed, spawn_key=(b, j))."""
    model = Semantica(MICRO)
    model.net = ConstantV()

    def noise(**kw):                                            # z_1 of a one-step, w = 0 sample of two samples
        model.net.calls.clear()
        model.sample(cond=torch.full((1, 5, 128), 0.2), num_samples=2, steps=1, guidance=0, **kw)
        return model.net.calls[0][0]

    a, b = noise(), noise()                                     # e.g. two images, evaluated one by one
    assert abs(np.corrcoef(a.flatten(), b.flatten())[0, 1]) < 0.15   # independent (1536 values: sd 0.026)
    torch.manual_seed(5)
    c = noise()
    torch.manual_seed(5)
    assert torch.equal(noise(), c) and not torch.equal(c, noise(seed=0))
    for seed in (0, 9):
        words = [np.random.SeedSequence(seed, spawn_key=(0, j)).generate_state(1, np.uint64)[0] for j in (0, 1)]
        want = torch.stack([torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(int(w) >> 1))
                            for w in words])
        assert torch.equal(noise(seed=seed), want) and torch.equal(noise(seed=seed), want)


def test_sample_converts_every_documented_image_kind_or_refuses_it(encoder):
    """PIL (any mode), numpy uint8 HWC, uint8 CHW tensors: the same samples as the hand-converted [-1, 1] tensor
    x / 127.5 - 1; [0, 1] floats, 0..255 floats, float or CHW numpy, HWC tensors, ints: one-line refusals."""
    model = randomize(Semantica(MICRO, encoder), seed=4)
    pixels = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    hand = torch.from_numpy(pixels.astype(np.float64) / 127.5 - 1).permute(2, 0, 1).float()
    kw = dict(num_samples=1, steps=2, seed=0)
    want = {n: model.sample(hand.expand(n, -1, -1, -1), **kw) for n in (1, 2)}
    u8 = torch.from_numpy(pixels).permute(2, 0, 1)
    for given in (pixels, pixels[None], [pixels, pixels], u8, u8[None], [u8, u8], Image.fromarray(pixels),
                  [Image.fromarray(pixels).convert("RGBA")] * 2):                 # opaque RGBA: the same pixels
        got = model.sample(given, **kw)
        assert torch.allclose(got, want[len(got)], atol=1e-6)
    gray = np.random.default_rng(2).integers(0, 256, (16, 16), dtype=np.uint8)
    three = torch.from_numpy(np.repeat(gray[None], 3, 0).astype(np.float64) / 127.5 - 1).float()
    assert torch.allclose(model.sample(gray, **kw), model.sample(three, **kw), atol=1e-6)    # (H, W): gray
    for bad, message in ((hand / 2 + 0.5, "no value below 0"), ((hand + 1) * 127.5, r"in \[-1, 1\], got values"),
                         (pixels.astype(np.float32), "uint8 HWC"), (pixels.transpose(2, 0, 1), "uint8 HWC"),
                         (torch.from_numpy(pixels), "CHW"), (u8.long(), "uint8 .* or float"),
                         ("a.png", "got str"), (torch.full((3, 16, 16), float("nan")), "NaN")):
        with pytest.raises(ValueError, match=message) as e:
            model.sample(bad, **kw)
        assert str(e.value).startswith("cond_images: ") and "\n" not in str(e.value)


def test_condition_is_one_float32_computation_in_training_and_sampling(encoder):
    """The frozen encoder runs outside autocast: under bf16 autocast the condition of a training step's loss and
    of a sample equals the float32 condition exactly (a 48 px image: the preprocessing resize included)."""
    model = randomize(Semantica(MICRO, encoder, p_uncond=0.0), seed=5)
    x = images(2, 48, seed=8)
    want = model.condition(x)
    seen = []
    model.net.register_forward_hook(lambda m, args, out: seen.append(args[2]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model.condition(x), want)
        model.loss(images(2, 16, 0), x, generator=torch.Generator().manual_seed(0))
        model.sample(x, num_samples=1, steps=1, guidance=0, seed=0)
    assert len(seen) == 2 and all(torch.equal(c, want) for c in seen)


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0), "steps"), (dict(steps=2.5), "steps"), (dict(num_samples=0), "num_samples"),
    (dict(guidance=float("nan")), "guidance"), (dict(guidance=float("inf")), "guidance"),
    (dict(gamma=float("nan")), "gamma"), (dict(seed=-1), "seed"), (dict(first_index=-1), "first_index")])
def test_sample_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Semantica(MICRO).sample(cond=torch.randn(1, 5, 128), **kwargs)


# ----------------------------------------------------------------------------- checkpoints

def write_checkpoint(path, model, ema, step=1000, ema_decay=0.99, prefix=""):
    """A checkpoint as train.py writes it (semantica.py's format + train-only keys)."""
    payload = {**checkpoint_header(model), "step": step, "ema_decay": ema_decay, "train_config": {"lr": 1.0},
               "model": {prefix + k: v for k, v in model.state_dict().items()},
               "ema": {prefix + k: v for k, v in ema.state_dict().items()}, "opt": {"state": {}}}
    save_checkpoint(path, payload)
    return path


def outputs(model, cond_images):
    g = torch.Generator().manual_seed(0)
    z_t, t = torch.randn(2, 3, 16, 16, generator=g), torch.rand(2, generator=g)
    with torch.no_grad():
        return model.net(z_t, t, model.condition(cond_images))


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("conditioning", ["cross_attention", "film"])
def test_checkpoint_roundtrip_ema_by_default(conditioning, tmp_path):
    enc = encoders.load_encoder("tiny", seed=3)          # a random encoder of seed 3 must come back as seed 3
    model = randomize(Semantica(dataclasses.replace(MICRO, conditioning=conditioning), enc, p_uncond=0.2), seed=2)
    ema = randomize(model.ema_copy(), seed=5)
    path = write_checkpoint(tmp_path / "ckpt.pt", model, ema, step=1234)
    cond_images = images(2, 32, 6)
    loaded = Semantica.from_checkpoint(path)
    assert not loaded.training and loaded.checkpoint_step == 1234 and loaded.p_uncond == 0.2
    assert loaded.config == model.config
    for k, v in enc.state_dict().items():                # rebuilt from its stored state, not from seed 0
        assert torch.equal(loaded.encoder.state_dict()[k], v), k
    assert not torch.equal(loaded.encoder.blocks[0].attn.qkv.weight,
                           encoders.load_encoder("tiny", seed=0).blocks[0].attn.qkv.weight)
    assert torch.equal(outputs(loaded, cond_images), outputs(ema.eval(), cond_images))       # EMA weights
    raw = Semantica.from_checkpoint(path, ema=False)
    assert torch.equal(outputs(raw, cond_images), outputs(model.eval(), cond_images))


def test_wrapped_state_dict_prefixes_are_stripped(encoder, tmp_path):
    model = randomize(Semantica(MICRO, encoder), seed=2)
    for prefix in ("module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."):
        path = write_checkpoint(tmp_path / "w.pt", model, model, prefix=prefix)
        loaded = Semantica.from_checkpoint(path)
        assert torch.equal(outputs(loaded, images(2, 32, 1)), outputs(model.eval(), images(2, 32, 1)))


def test_checkpoint_rebuilds_an_encoder_whose_activation_was_stated(tmp_path):
    """An OpenCLIP visual.* file records no activation; the checkpoint's encoder identity does, and the loader
    states it again when rebuilding: the same GELU tower, not a refusal or a QuickGELU guess."""
    data = Path(__file__).parent / "data" / "encoders"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.save(torch.jit.load(str(data / "clip_openai.pt")).state_dict(), tmp_path / "open_clip.bin")
    enc = encoders.from_checkpoint(tmp_path / "open_clip.bin", act="gelu")
    model = randomize(Semantica(dataclasses.replace(MICRO, cond_dim=enc.dim), enc), seed=2)
    loaded = Semantica.from_checkpoint(write_checkpoint(tmp_path / "ckpt.pt", model, model))
    assert loaded.encoder.config.act == "gelu"
    assert torch.equal(outputs(loaded, images(2, 16, 1)), outputs(model.eval(), images(2, 16, 1)))


def test_checkpoint_refuses_another_encoder_and_stays_untouched(tmp_path):
    file_a, file_b = tmp_path / "a.pth", tmp_path / "b.pth"
    encoders.save_dinov2(encoders.load_encoder("tiny", seed=1), file_a)
    encoders.save_dinov2(encoders.load_encoder("tiny", seed=2), file_b)
    enc_a = encoders.load_encoder("tiny", weights=str(file_a))
    model = randomize(Semantica(MICRO, enc_a), seed=2)
    path = write_checkpoint(tmp_path / "ckpt.pt", model, model)
    before = sha(path)
    with pytest.raises(ValueError, match=r"trained with tiny \(weights .*a\.pth.*got tiny \(weights .*b\.pth"):
        Semantica.from_checkpoint(path, encoder=encoders.load_encoder("tiny", weights=str(file_b)))
    with pytest.raises(ValueError, match="encoder mismatch"):
        Semantica.from_checkpoint(path, encoder_weights=str(file_b))                  # same name, other file
    with pytest.raises(ValueError, match=r"got tiny \(random init"):
        Semantica.from_checkpoint(path, encoder=encoders.load_encoder("tiny"))       # random vs pretrained
    moved = tmp_path / "moved.pth"
    file_a.rename(moved)
    with pytest.raises(ValueError, match="not at .*a.pth"):
        Semantica.from_checkpoint(path)
    assert Semantica.from_checkpoint(path, encoder_weights=str(moved)).encoder.weights == str(moved)  # same sha256
    assert sha(path) == before                                                      # rejected: left untouched
    identity = checkpoint_header(model)["encoder"]                                  # another model of the same width
    identity = {**identity, "name": "siglip-b16-256",
                "config": dataclasses.asdict(encoders.ENCODER_PRESETS["siglip-b16-256"])}
    with pytest.raises(ValueError, match=r"trained with siglip-b16-256 .* got tiny"):
        check_encoder(identity, encoders.load_encoder("tiny", weights=str(moved)))


def test_random_encoder_seed_mismatch_is_refused(tmp_path):
    model = Semantica(MICRO, encoders.load_encoder("tiny", seed=3))
    path = write_checkpoint(tmp_path / "ckpt.pt", model, model)
    with pytest.raises(ValueError, match="encoder mismatch"):
        Semantica.from_checkpoint(path, encoder=encoders.load_encoder("tiny", seed=0))
    identity = checkpoint_header(model)["encoder"]
    assert torch.equal(build_encoder(identity).pos_embed, model.encoder.pos_embed)
    # The stored state is the identity, not the seed: a random init that a later encoders.py draws
    # differently (simulated by changing the stored state) still comes back as stored.
    state = {**identity["state"], "pos_embed": identity["state"]["pos_embed"] + 1}
    assert torch.equal(build_encoder({**identity, "state": state}).pos_embed, state["pos_embed"])


def test_bad_checkpoints_are_one_line_errors(encoder, tmp_path):
    model = Semantica(dataclasses.replace(MICRO, conditioning="film"), encoder)
    path = write_checkpoint(tmp_path / "ckpt.pt", model, model)
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, "model_config": {**ckpt["model_config"], "width": 64}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt.*do not fit"):
        Semantica.from_checkpoint(tmp_path / "bad.pt")
    torch.save({k: v for k, v in ckpt.items() if k != "format"}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=f"old.pt: not a {FORMAT}"):
        Semantica.from_checkpoint(tmp_path / "old.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: cannot read"):
        Semantica.from_checkpoint(tmp_path / "junk.pt")
    for name, data in (("text.md", b"# a README\n"), ("pickle.pt", None)):   # torch's message would invite
        if data is None:                                                 # weights_only=False: never repeated
            torch.save({"format": FORMAT, "obj": argparse.Namespace(a=1)}, tmp_path / name)
        else:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"{name}: cannot read the checkpoint") as e:
            Semantica.from_checkpoint(tmp_path / name)
        assert "weights_only" not in str(e.value) and "\n" not in str(e.value)
    torch.save({"format": FORMAT}, tmp_path / "cut.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "cut.pt").read_bytes()[:40])     # a truncated torch file
    with pytest.raises(ValueError, match="cut.pt: cannot read the checkpoint"):
        Semantica.from_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(FileNotFoundError):
        Semantica.from_checkpoint(tmp_path / "missing.pt")


def test_young_ema_warns(encoder, tmp_path):
    model = Semantica(MICRO, encoder)
    young = write_checkpoint(tmp_path / "young.pt", model, model, step=100, ema_decay=0.99)
    with pytest.warns(UserWarning, match=r"EMA at step 100 with decay 0.99 still holds 37% of the initial"):
        Semantica.from_checkpoint(young)                                # 0.99^100 = 0.366
    old = write_checkpoint(tmp_path / "old.pt", model, model, step=1000, ema_decay=0.99)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Semantica.from_checkpoint(old)                                  # 0.99^1000 = 4e-5: silent
        Semantica.from_checkpoint(young, ema=False)                     # raw weights: nothing to warn about


def test_save_checkpoint_is_atomic(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1})
    with pytest.raises(Exception):
        save_checkpoint(path, {"step": 2, "bad": lambda: None})         # fails while pickling
    assert torch.load(path, weights_only=True) == {"step": 1}           # the previous file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]          # and no temporary file is left


def test_model_folder_hash_covers_weights_and_config_only(tmp_path):
    from semantica import file_sha256
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "config.json").write_text("{}")
    before = file_sha256(tmp_path)
    (tmp_path / "README.md").write_text("downloaded another way")                 # extras do not count
    assert file_sha256(tmp_path) == before
    (tmp_path / "model.safetensors").write_bytes(b"other weights")                # the weights do
    assert file_sha256(tmp_path) != before
    assert file_sha256(tmp_path / "config.json") == hashlib.sha256(b"{}").hexdigest()  # a file: its bytes


def test_film_on_clip_conditions_on_the_projected_global_width():
    """App. D FiLM takes the encoder's global feature; CLIP's is the projected CLS (embed_dim, narrower than
    its tokens), so cond_dim follows the conditioning kind: tokens for cross-attention, global for FiLM."""
    import semantica
    enc = encoders.load_encoder("clip-b16", seed=0)
    assert (semantica.cond_width(enc, "cross_attention"), semantica.cond_width(enc, "film")) == (768, 512)
    cfg = dataclasses.replace(uvit.PRESETS["tiny-32"], conditioning="film", cond_dim=512)
    Semantica(cfg, enc)                                                    # accepted
    with pytest.raises(ValueError, match="512-dim"):
        Semantica(dataclasses.replace(cfg, cond_dim=768), enc)


def test_loss_and_condition_dropout_draw_from_the_given_generator(encoder):
    """All of a training step's randomness (t, eps, which rows are dropped to the null) comes from `generator`:
    the same seed gives the same loss and mask whatever the global RNG did, another seed another loss;
    a dropped bf16 condition stays bf16 (the null is cast to the condition's dtype)."""
    torch.manual_seed(0)
    model = randomize(Semantica(MICRO, encoder, p_uncond=0.5))
    x, c = images(8, 16, 1), images(8, 32, 2)
    first = model.loss(x, c, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(123)                                               # the global RNG must not matter
    assert torch.equal(model.loss(x, c, generator=torch.Generator().manual_seed(7)), first)
    assert not torch.equal(model.loss(x, c, generator=torch.Generator().manual_seed(8)), first)
    cond = model.as_cond(c)
    masks = [(model.drop_condition(cond, torch.Generator().manual_seed(s)) == model.null_cond).flatten(1).all(1)
             for s in (3, 3, 4)]
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    assert model.drop_condition(cond.bfloat16(), torch.Generator().manual_seed(3)).dtype == torch.bfloat16
