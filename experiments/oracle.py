"""Would the default job draw its condition's kind if the condition carried it? An oracle-condition run.

Not part of the paper (DESIGN throughout; issue 20, "against encoder quality"). Semantica's frozen encoder
(DINOv2, §3.2) hands the denoiser tokens in which an image's semantics are easy to read; the CPU default
job's random `tiny` encoder does not (experiments/SWEEP.md, probe: a linear read-out of the object kind from
its tokens is right 29 % of the time). This separates the two possible limits of the default job:
  - the encoder: the tokens do not carry the kind;
  - the denoiser: with 600 steps of batch 32 it cannot yet draw a kind, whatever the tokens say.
The oracle condition is the random encoder's tokens (B, T, D) plus a fixed random vector e_k (N(0, 1) per
dimension, the tokens' own scale after their final LayerNorm) of the condition's true kind k, added to every
token: the kind is then a linear read-out of any token. Everything else is the default job
(`python train.py`: tiny-32, 512 synthetic pages, Adam (0.9, 0.99, 1e-12) at lr 1e-3, batch 32, EMA 0.99,
p_uncond 0.1, no pair filter), in a short loop that mirrors train.py's step, because train.py's encoder
sees images only and the kind is page metadata. Kind agreement as in experiments/kinds.py, on the same
held-out conditions, each sampled with its own oracle condition.

    python experiments/sweep.py --parts oracle --lengths 600,2000     # writes its table to SWEEP.md
"""
import copy
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import encoders  # noqa: E402
import semantica  # noqa: E402
from pages import synthetic  # noqa: E402
import uvit  # noqa: E402

KIND_SEED = 7        # DESIGN: seed of the fixed kind vectors e_k
# The default job's flags (train.py RES_PRESETS[32] over TrainConfig's §6.1 Adam constants).
JOB = dict(model="tiny-32", num_pages=512, batch=32, lr=1e-3, betas=(0.9, 0.99), eps=1e-12, ema_decay=0.99, seed=0)


def kind_vectors(dim, num_kinds=len(synthetic.KINDS), seed=KIND_SEED):
    """The fixed kind vectors e_k -> (num_kinds, dim), N(0, 1) entries."""
    return torch.randn(num_kinds, dim, generator=torch.Generator().manual_seed(seed))


def with_kind(tokens, kind, vectors):
    """Tokens (B, T, D) plus e_kind (B,) on every token -> (B, T, D): the oracle condition."""
    return tokens + vectors[kind][:, None, :]


def oracle_cond(model, images, kind, vectors):
    """Encoder tokens of `images` (B, 3, S, S) in [-1, 1] plus e_kind on every token -> (B, T, D)."""
    with torch.no_grad():
        tokens = model.condition(images)
    return with_kind(tokens, kind, vectors)


def new_state(job=JOB):
    """A fresh run: Semantica (tiny-32, random tiny encoder), its EMA, Adam, step 0, the noise generator."""
    torch.manual_seed(job["seed"])
    encoder = encoders.load_encoder("tiny", seed=job["seed"])
    config = dataclasses.replace(uvit.PRESETS[job["model"]], cond_dim=semantica.cond_width(encoder, "cross"))
    model = semantica.Semantica(config, encoder=encoder)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=job["lr"],
                           betas=job["betas"], eps=job["eps"])
    return dict(model=model, ema=copy.deepcopy(model).eval(), opt=opt, step=0,
                gen=torch.Generator().manual_seed(job["seed"]))


def train(state, steps, job=JOB, log=print):
    """Train `state` on to `steps` (step s trains on page pairs s * batch ... s * batch + batch - 1)
    -> mean training loss of the last (up to) 100 steps."""
    pages = synthetic.SyntheticPages(job["num_pages"], 32, seed=job["seed"])
    pairs = data.PagePairs(pages, mode="page", seed=job["seed"])
    model, ema, opt, gen = state["model"], state["ema"], state["opt"], state["gen"]
    vectors = kind_vectors(model.config.cond_dim)
    model.train()
    t0, recent = time.time(), []
    while state["step"] < steps:
        items = [pairs.pair(state["step"] * job["batch"] + j) for j in range(job["batch"])]
        cond = torch.stack([pages.image(p, c) for p, c, _ in items])
        target = torch.stack([pages.image(p, t) for p, _, t in items])
        kind = torch.tensor([pages.kind(p, c) for p, c, _ in items])     # what the condition shows
        loss = model.loss(target, oracle_cond(model, cond, kind, vectors), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        semantica.update_ema(ema, model, job["ema_decay"])
        state["step"] += 1
        recent = (recent + [loss.item()])[-100:]
        if state["step"] % 100 == 0:
            log(f"oracle step {state['step']}/{steps}: loss {loss.item():.4f}, {time.time() - t0:.0f} s")
    return sum(recent) / max(len(recent), 1)


def save(state, path):
    """Atomic save of a run (weights, optimiser, step, generator state)."""
    torch.save(dict(model=state["model"].state_dict(), ema=state["ema"].state_dict(),
                    opt=state["opt"].state_dict(), step=state["step"], gen=state["gen"].get_state()), path + ".tmp")
    os.replace(path + ".tmp", path)


def load(path, job=JOB):
    """A run saved by save() -> state; continuing it gives the same losses as an uninterrupted run."""
    state, saved = new_state(job), torch.load(path, map_location="cpu", weights_only=True)
    state["model"].load_state_dict(saved["model"])
    state["ema"].load_state_dict(saved["ema"])
    state["opt"].load_state_dict(saved["opt"])
    state["gen"].set_state(saved["gen"])
    state["step"] = saved["step"]
    return state


def sample(state, cond, kind, n, guidance, steps, seed=0):
    """EMA variations of held-out conditions (M, 3, S, S) with their oracle tokens -> (M, n, 3, S, S)."""
    ema = state["ema"]
    return ema.sample(cond=oracle_cond(ema, cond, kind, kind_vectors(ema.config.cond_dim)), num_samples=n,
                      guidance=guidance, steps=steps, seed=seed)
