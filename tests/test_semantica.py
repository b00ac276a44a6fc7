"""semantica.py: frozen encoder outside the module tree, condition dropout, gradients, overfitting,
batched guided sampling, checkpoints."""
import copy
import dataclasses

import pytest
import torch

import diffusion
import encoders
import uvit
from semantica import Semantica
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


def test_encoder_is_frozen_and_outside_the_module_tree(encoder):
    model = Semantica(MICRO, encoder)
    enc_params = {id(p) for p in encoder.parameters()}
    assert not enc_params & {id(p) for p in model.parameters()}                # not in the optimiser / EMA
    assert not any(k.startswith("encoder") for k in model.state_dict())        # not in checkpoints
    assert set(model.state_dict()) == {"null_cond"} | {"net." + k for k in model.net.state_dict()}
    model.train()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    ema = copy.deepcopy(model)                                                  # EMA copies share the encoder
    assert ema.encoder is encoder and ema.net is not model.net
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


@pytest.mark.parametrize("p_uncond", [0.0, 0.1, 1.0])
def test_null_condition_used_at_the_configured_rate(p_uncond):
    model = Semantica(MICRO, p_uncond=p_uncond)
    cond = torch.randn(20_000, 3, 128)
    out = model.drop_condition(cond, generator=torch.Generator().manual_seed(0))
    is_null = (out == model.null_cond).all(dim=(1, 2))
    is_cond = (out == cond).all(dim=(1, 2))
    assert torch.all(is_null ^ is_cond)         # each example keeps its condition or gets the whole null
    assert abs(is_null.float().mean().item() - p_uncond) < 0.01


def test_gradients_reach_every_trainable_parameter_and_never_the_encoder(encoder):
    for conditioning in ("cross_attention", "film"):
        model = randomize(Semantica(dataclasses.replace(MICRO, conditioning=conditioning), encoder, p_uncond=0.5))
        model.loss(images(8, 16, 0), images(8, 32, 1), generator=torch.Generator().manual_seed(0)).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert all(p.grad is None for p in encoder.parameters())


@pytest.mark.slow  # ~20 s on one CPU core
def test_overfits_one_pair(encoder):
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


def test_sample_batches_conditional_and_null_passes(encoder):
    model = randomize(Semantica(MICRO, encoder), seed=1)
    batches = []
    model.net.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    cond_images = images(2, 32, seed=4)
    x = model.sample(cond_images, num_samples=3, steps=4, guidance=0.5, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 3, 16, 16) and x.abs().max() <= 1.0
    assert batches == [2 * 2 * 3] * 4                          # one network call per step on [cond; null]
    again = model.sample(cond_images, num_samples=3, steps=4, guidance=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, again)                              # deterministic given the generator
    assert model.training                                     # sampling restores the mode


def test_save_load_roundtrip_and_mismatch_errors(encoder, tmp_path):
    model = randomize(Semantica(dataclasses.replace(MICRO, conditioning="film"), encoder, p_uncond=0.2), seed=2)
    path = tmp_path / "model.pt"
    model.save(path, step=7)
    loaded = Semantica.from_checkpoint(path)                  # encoder rebuilt from its stored name
    assert loaded.config == model.config and loaded.p_uncond == 0.2 and loaded.encoder_spec == {"name": "tiny", "weights": None}
    z_t, t, cond_images = images(2, 16, 5), torch.rand(2), images(2, 32, 6)
    cond = model.condition(cond_images)
    assert torch.equal(loaded.condition(cond_images), cond)
    assert torch.equal(loaded.eval().net(z_t, t, cond), model.eval().net(z_t, t, cond))

    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["width"] = 64                                # weights no longer fit the config
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt.*do not match"):
        Semantica.from_checkpoint(tmp_path / "bad.pt")
    torch.save({"model": ckpt["model"]}, tmp_path / "noconfig.pt")
    with pytest.raises(ValueError, match="not a Semantica checkpoint"):
        Semantica.from_checkpoint(tmp_path / "noconfig.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        Semantica.from_checkpoint(tmp_path / "junk.pt")
