"""Train Semantica: one straight-line script for one CPU, torchrun DDP/FSDP on GPUs, or torch_xla on TPUs.

Semantica (arXiv 2405.14857) §5-§6.1: an image-conditioned U-ViT diffusion model trained on pairs of
images from the same web page; frozen encoder tokens condition the denoiser through cross-attention.
Recipe (§6.1): Adam (beta1 0.9, beta2 0.99, eps 1e-12), lr 2e-4, batch 2048, EMA ("Polyak
averaging") 0.9999, v-prediction with eps-space loss, ~300K steps; pairs filtered by encoder
cosine similarity (§5, App. C: DINOv2 [0.3, 0.9], SigLIP/CLIP 0.65).

    python train.py                                            # the CPU default job (tiny-32-p2, toy encoder), 9.5-13 min
    python train.py --res 256 --data DIR --encoder-weights dinov2_vitb14_pretrain.pth   # §6.1 baseline
    torchrun --standalone --nproc_per_node=8 train.py --res 256 --data DIR --encoder-weights ...
    torchrun --standalone --nproc_per_node=8 train.py --res 512 --data DIR --encoder-weights ...  # FSDP
    PJRT_DEVICE=TPU python train.py --backend xla --res 256 ...          # torch_xla
    python train.py --out runs/tiny --resume [--reshard]               # continue (another world size)

Structure of `main`, as in karpathy/nanoGPT train.py @3adf61e and facebookresearch/DiT train.py @ed81ce2:
set-up -> model, EMA (restored on --resume), optimiser -> data -> loop (step, log, checkpoint, grid) -> end.
The run's bookkeeping lives in machinery/runs.py: validation of the flags and inputs, checkpoints and the
checks of an exact resume, logs, signals. Each backend's differences (DDP, FSDP2, torch_xla) sit in small
functions of machinery/backends.py (`backends.wrap`, `backends.poll_stop`, ...), not in branches through
the loop; the flags come from TrainConfig through machinery/flags.py.
Checkpoint: the one format of semantica.py ("semantica-ckpt/2", loaded by Semantica.from_checkpoint)
plus train-only keys (optimizer, world, data position).
Shapes: B batch, 3 x S x S images in [-1, 1].
Not implemented: learning-rate schedules (the paper states none), SPMD on TPU.
"""
import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from machinery import backends, flags, runs
from machinery.runs import UserError, filter_band
import data
import encoders
from pages import images
import semantica
from pages import shards
from pages import stream
from pages import toy_encoder
import uvit


@dataclass
class TrainConfig:
    # The end-of-line comment of each field is its --help text (machinery/flags.py reads this source).
    res: int = 32                      # resolution preset (RES_PRESETS): 32 = the CPU default job, 256 / 512 = §6.1
    model: str = "sid-b-256"           # U-ViT preset (uvit.PRESETS); sid-b-256 is the §6.1 baseline
    conditioning: str = "cross_attention"  # cross_attention (encoder tokens) or film (global feature); §6.2: cross-attention wins
    encoder: str = "dinov2-b14"        # frozen encoder preset (encoders.ENCODER_PRESETS); dinov2-b14 is the §6.1 baseline
    encoder_weights: str = ""          # the encoder's official weight file (required for real encoders)
    encoder_act: str = ""              # MLP activation of an --encoder-weights file that does not record it (OpenCLIP visual.* state dicts): quick_gelu (OpenAI weights) or gelu (LAION, DataComp); none: from the file or the family
    random_encoder: bool = False       # allow a randomly initialised encoder (smoke runs only)
    toy_encoder: bool = False          # --encoder tiny trained once on held-out synthetic pages' alt text (pages/toy_encoder.py; committed in weights/, retrained there if its recipe changes): the 32 px job's stand-in for pretrained weights
    data: str = "synthetic"            # image folder ROOT/<page>/<image>, manifest (.jsonl/.csv), "synthetic", or page shards 'DIR/{000000..000999}.tar' (streamed)
    cond_cache: str = ""               # precomputed conditioning (python data.py encode): train without running the encoder (§3.2); "shards": the tokens in the --data shards (data.py filter --image-size); "encode": encode every training image once into OUT/cond first
    pairs: str = "page"                # page: pairs from one web page (§5, Eq. 3); same: reconstruction (§4, Eq. 2)
    num_pages: int = 2048              # number of synthetic pages (DESIGN)
    filter_low: Optional[float] = None   # pair filter lower cosine threshold; default: the encoder's (App. C: DINOv2 0.3, SigLIP/CLIP 0.65); -1 with 1 = no filter
    filter_high: Optional[float] = None  # pair filter upper threshold (drops near-duplicates); default: the encoder's (App. C: 0.9)
    select_pairs: bool = False         # draw the §5 pair selection's kept pairs even with the band [-1, 1] (a page weighted by its pairs, as a filtered run weights it: App. C's unfiltered arm); off: an unfiltered run draws pages uniformly
    steps: int = 300_000               # optimiser steps (§6.1: "around 300K steps")
    batch: int = 2048                  # global batch = micro-batch x accumulation x world (§6.1: 2048)
    micro_batch: int = 0               # per-device batch per forward pass; 0 = batch / world (no accumulation)
    lr: float = 2e-4                   # Adam learning rate (§6.1)
    beta1: float = 0.9                 # Adam beta1 (§6.1)
    beta2: float = 0.99                # Adam beta2 (§6.1)
    adam_eps: float = 1e-12            # Adam epsilon (§6.1)
    ema_decay: float = 0.9999          # EMA decay (§6.1: "Polyak averaging with a decay factor of 0.9999")
    sigmoid_bias: Optional[float] = None  # weight the eps-space loss by sigmoid(b - logSNR) (Kingma & Gao 2023; SiD2): favours low SNR, the CPU preset's DEVIATION; none: §3.1's unweighted loss
    p_uncond: float = 0.1              # condition dropout rate for guidance (INTERPRETATION: not stated in the paper)
    guidance: float = 0.5              # guidance weight of the variation grids (§6.1)
    sample_steps: int = 256            # DDPM steps of the variation grids (DESIGN)
    grid_images: int = 4               # conditioning images in a variation grid (rows)
    grid_n: int = 6                    # variations per conditioning image (columns after the condition)
    seed: int = 0                      # seed of the model init, the data order and every random draw
    out: str = "runs/tiny"             # run folder: ckpt.pt, log.jsonl, config.json, grids, loss.png
    resume: bool = False               # continue from OUT/ckpt.pt (model, EMA, optimiser, step, data position)
    reshard: bool = False              # with --resume: allow another world size (same global batch; not bit-identical)
    log_every: int = 100               # steps between log lines
    ckpt_every: int = 5000             # steps between checkpoints (also written at the end and on SIGTERM/SIGINT)
    sample_every: int = 20_000         # steps between variation grids
    tensorboard: bool = False          # also log to OUT/tb (needs the tensorboard package)
    device: str = ""                   # cpu, cuda or cuda:N; empty = cuda (the local rank's GPU) when available, else cpu
    backend: str = "auto"              # auto (ddp under torchrun, else single), single, ddp or xla
    fsdp: bool = False                 # shard parameters, gradients and optimiser state with FSDP2 (ddp backend)
    grad_checkpoint: bool = False      # recompute activations in the backward pass (saves memory)
    compile: bool = False              # torch.compile the denoiser
    bf16: bool = True                  # bf16 autocast on CUDA/XLA with fp32 master weights; CPU stays fp32
    num_workers: int = 4               # DataLoader worker processes per rank
    shuffle_buffer: int = 1000         # page shards (--data PATTERN.tar): items in each data worker's shuffle buffer (DESIGN)
    max_pixels: int = -1               # decompression-bomb limit per image in pixels; -1 = Pillow's Image.MAX_IMAGE_PIXELS at call time, 0 = no limit


# Applied before explicit flags. Unlisted fields keep the paper defaults above.
RES_PRESETS = {
    # DEVIATION: CPU default job (docs/results.md, "The default job"): 32 px, 9.5-13 min on 2 cores. The tiny-32-p2
    # denoiser (0.31 GFLOP per image forward + backward, 2x2 patchify stem as §6.1's 512 px model), the toy
    # encoder (pages/toy_encoder.py: the tiny ViT trained SigLIP-style on held-out pages, committed in weights/)
    # whose tokens are encoded once into OUT/cond (§3.2), 512 synthetic pages, no filter; batch 32 instead of
    # 2048, lr 1e-3 (2e-3 drew no more kinds at 64 000 images, batch 64 fewer), EMA 0.99 because the run is
    # short (0.9999 would still hold the random init), 4 000 steps (128 000 images), and the eps-space loss
    # weighted by sigmoid(-1 - logSNR) (Kingma & Gao 2023; SiD2): kind accuracy 0.31 -> 0.61 at 64 000 images.
    32: dict(model="tiny-32-p2", encoder="tiny", toy_encoder=True, cond_cache="encode", num_pages=512,
             filter_low=-1.0, filter_high=1.0, steps=4000, batch=32, lr=1e-3, ema_decay=0.99, sigmoid_bias=-1.0,
             sample_steps=64, log_every=25, ckpt_every=500, sample_every=1000, num_workers=0, out="runs/tiny"),
    # §6.1 baseline: SiD-B U-ViT at 256 px, DINOv2-B/14 tokens, filter [0.3, 0.9], batch 2048.
    # DESIGN: micro_batch 32 per GPU (8 GPUs -> accumulation 8); the paper used 256 TPUv3 chips.
    256: dict(model="sid-b-256", encoder="dinov2-b14", micro_batch=32, out="runs/semantica-256",
              log_every=100, ckpt_every=5000, sample_every=20_000),
    # §6.1 final model at 512 px (2x2 patchify, 4096-channel transformer: billions of parameters).
    # INTERPRETATION: DINOv2-L/14, the best encoder of Table 1; the paper does not name the final one.
    # DESIGN: FSDP2 + activation checkpointing so Adam state + EMA fit on 80 GB cards.
    512: dict(model="semantica-512", encoder="dinov2-l14", micro_batch=8, fsdp=True, grad_checkpoint=True,
              out="runs/semantica-512", log_every=100, ckpt_every=2000, sample_every=20_000),
}
CHOICES = {"conditioning": ("cross_attention", "film"), "pairs": ("page", "same"),
           "backend": ("auto", "single", "ddp", "xla"), "encoder_act": encoders.CLIP_ACTIVATIONS}


def parse_args(argv=None):
    """Flags generated from TrainConfig; `--res` picks a RES_PRESETS entry applied before explicit flags."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--res", type=int, default=TrainConfig.res, choices=sorted(RES_PRESETS))
    pre.add_argument("--toy-encoder", action="store_true")
    pre.add_argument("--random-encoder", action="store_true")
    pre.add_argument("--cond-cache")
    known = pre.parse_known_args(argv)[0]
    res = known.res
    defaults = {**asdict(TrainConfig()), **RES_PRESETS[res], "res": res}
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n")[0], allow_abbrev=False)
    types = {"device": flags.device, "sigmoid_bias": flags.finite_or_none}
    flags.add_flags(parser, TrainConfig, os.path.abspath(__file__), defaults, CHOICES, types)
    cfg = TrainConfig(**vars(parser.parse_args(argv)))  # unknown flags: argparse error, exit 2
    preset = RES_PRESETS[res]
    if preset.get("toy_encoder") and (cfg.encoder != preset["encoder"] or cfg.encoder_weights or known.random_encoder) \
            and not known.toy_encoder:
        cfg = dataclasses.replace(cfg, toy_encoder=False)  # the preset trains its own tiny encoder only
    if preset.get("cond_cache") == "encode" and shards.is_pattern(cfg.data) and known.cond_cache is None:
        cfg = dataclasses.replace(cfg, cond_cache="")      # page shards: tokens in the shards, or the encoder live
    problem = runs.check_numbers(cfg)
    if problem:
        parser.error(problem)  # before any work: one line, exit 2
    return cfg


# ----------------------------------------------------------------------------- batch, seeds, optimiser (§6.1)

def batch_plan(cfg, world):
    """(micro_batch, accumulation): global batch = micro_batch x accumulation x world (§6.1: 2048)."""
    micro = cfg.micro_batch or cfg.batch // world
    if micro < 1 or cfg.batch % (micro * world):
        raise UserError(f"--batch {cfg.batch} must be divisible by --micro-batch {micro} x world {world}")
    return micro, cfg.batch // (micro * world)


def micro_step_seed(seed, rank, step, k):
    """Seed of micro-step k of optimiser step `step` on `rank`: distinct for any accumulation, world and
    step (numpy SeedSequence hashes the tuple), and a function of the tuple only, so a resumed run draws
    exactly what an uninterrupted one draws at that step."""
    return int(np.random.SeedSequence([seed, rank, step, k]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def make_optimizer(cfg, params, device):
    """Adam with §6.1's constants: lr 2e-4, betas (0.9, 0.99), eps 1e-12 (from cfg)."""
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                            fused=device.type == "cuda")


# ----------------------------------------------------------------------------- model, data, grids

def load_frozen_encoder(cfg, identity=None):
    """The frozen encoder: rebuilt from a checkpoint's identity, or the toy encoder (--toy-encoder), or official
    weights, or (--random-encoder) a random init seeded by --seed, identical on every rank."""
    try:
        if identity is not None:
            return semantica.build_encoder(identity, weights=cfg.encoder_weights or None)
        if cfg.toy_encoder:                                     # trained once, then cached by its recipe
            weights = toy_encoder.pretrained(log=runs.say)     # the committed file in weights/
            return encoders.load_encoder(cfg.encoder, weights=weights)
        if cfg.encoder_weights:
            return encoders.load_encoder(cfg.encoder, weights=cfg.encoder_weights, act=cfg.encoder_act or None)
        return encoders.load_encoder(cfg.encoder, seed=cfg.seed, act=cfg.encoder_act or None)  # --random-encoder (check_paths)
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"encoder {cfg.encoder}: {e}") from e


def build_model(cfg, encoder):
    """Semantica = frozen encoder + U-ViT denoiser sized by the preset, conditioned on the encoder."""
    net_cfg = dataclasses.replace(uvit.PRESETS[cfg.model], conditioning=cfg.conditioning,
                                  cond_dim=semantica.cond_width(encoder, cfg.conditioning))
    return semantica.Semantica(net_cfg, encoder=encoder, p_uncond=cfg.p_uncond)


def max_pixels(flag):
    """--max-pixels -> images.py's max_pixels: None = Pillow's setting at call time, 0 = no limit."""
    return None if flag < 0 else flag


def encode_conditions(cfg, pages, encoder, d):
    """--cond-cache encode: every image of `pages` through the frozen encoder once, into OUT/cond (§3.2: "we can
    precompute representations"; tokens stored float16), reused while it matches the pages and the encoder
    -> the cache folder. (Page shards carry their own tokens instead: runs.check_paths refuses them here.)"""
    out = os.path.join(cfg.out, "cond")
    try:
        fresh = data.CondCache.open(out, pages, encoder) is not None
    except (OSError, ValueError):
        fresh = False
    backends.barrier(d)                                  # every rank has looked before rank 0 rewrites it
    if not fresh:
        data.PagePairs(pages, mode=cfg.pairs, seed=cfg.seed)    # no training items: one line, before encoding
        data.encode_cache(pages, encoder, out, d.rank, d.world, barrier=lambda: backends.barrier(d))
        backends.barrier(d)                              # rank 0 writes meta.json last
    return out


def build_dataset(cfg, image_size, encoder, d, ckpt):
    """-> ((cond, target) pairs from pages (§5), similarity-filtered with the frozen encoder (App. C), the
    synthetic pages' fingerprint or None). With --cond-cache the conditions (and the filter's embeddings) come
    from the precomputed cache (§3.2; `encode`: made here first). A missing or empty source, a cache of other
    images or another encoder, a resume on other synthetic pages (refused before anything is written):
    UserError. Page shards (--data PATTERN.tar) are streamed instead (stream_dataset)."""
    if shards.is_pattern(cfg.data):
        return stream_dataset(cfg, image_size, encoder, d), None
    cache, kind = cfg.cond_cache or None, "tokens" if cfg.conditioning == "cross_attention" else "global"  # §3.4
    if cache == "shards":
        raise UserError("--cond-cache shards reads tokens stored in page shards: --data must be a shard pattern")
    try:
        pages, skipped = data.open_pages(cfg.data, image_size, max_pixels=max_pixels(cfg.max_pixels), **(
            dict(num_pages=cfg.num_pages, seed=cfg.seed) if cfg.data == "synthetic" else {}))
        pages_id = runs.check_resume_pages(ckpt, cfg, pages, runs.say if d.is_main else (lambda *a: None))
        if cache == "encode":
            cache = encode_conditions(cfg, pages, encoder, d)
        pairs = None
        if cfg.pairs == "page" and (cfg.select_pairs or cfg.filter_low > -1 or cfg.filter_high < 1):
            for turn in ((0, 1) if d.kind == "ddp" and d.world > 1 else (0,)):  # rank 0 fills the cache first
                if (d.rank == 0) == (turn == 0):
                    pairs, report = data.build_pairs(pages, encoder, os.path.join(cfg.out, "cache"), cfg.filter_low,
                                                     cfg.filter_high, cond_cache=cache)
                backends.barrier(d)
            if d.is_main:
                runs.say({k: v for k, v in report.items() if k != "histogram"}, "\n" + report["histogram"])
        dataset = data.PagePairs(pages, mode=cfg.pairs, pairs=pairs, seed=cfg.seed, cond_cache=cache,
                                 cond_kind=kind, encoder=encoder)
    except UserError:
        raise
    except (OSError, ValueError) as e:
        raise UserError(f"--data {cfg.data}{' --cond-cache ' + cache if cache else ''}: {e}") from e
    if d.is_main and skipped:
        runs.say(f"skipped {len(skipped)} unreadable files, e.g. {next(iter(skipped.items()))}")
    return dataset, pages_id


def stream_dataset(cfg, image_size, encoder, d):
    """Page shards streamed by every rank (stream.ShardStream). Nothing is listed or opened up front except
    the first readable page (shards.first_page; check_paths already refused a pattern without one and shards
    not filtered with the run's band), which says for --cond-cache shards whether its tokens are this
    encoder's at this size for cross-attention (runs.check_shard_tokens). An unfiltered run on shards that
    carry a filter result gets a warning (their kept pairs are not used, App. C)."""
    if d.kind == "xla" and d.world > 1:  # their positions would need a host-side gather (untested)
        raise UserError("page shards under --backend xla run on one device only for now (CPU_NUM_DEVICES=1 / "
                        "one TPU core); several replicas: write a folder or manifest source")
    filtered = cfg.pairs == "page" and (cfg.filter_low > -1 or cfg.filter_high < 1)
    tokens = cfg.cond_cache == "shards"
    try:
        dataset = stream.ShardStream(cfg.data, image_size, cfg.pairs, (cfg.filter_low, cfg.filter_high) if filtered
                                     else None, "tokens" if tokens else "pixels", cfg.seed, d.rank, d.world,
                                     cfg.shuffle_buffer, max_pixels(cfg.max_pixels), encoder=encoder)
        _, first = shards.first_page(dataset.urls, shards.PROBE_SHARDS, quiet=True)   # logged by check_paths
    except ValueError as e:
        raise UserError(f"--data {cfg.data}: {e}") from e
    f = first["meta"].get("filter") or {}
    if tokens:
        runs.check_shard_tokens(f, cfg, encoder, image_size)
    if d.is_main and f and not filtered and cfg.pairs == "page":
        runs.say(f"warning: the shards carry a §5 filter result for [{f['low']}, {f['high']}] ({f['encoder']}), but this run "
                 f"is unfiltered (band [{cfg.filter_low}, {cfg.filter_high}]): their kept pairs are not used; pass "
                 f"--filter-low {f['low']} --filter-high {f['high']} to train on them")
    if d.is_main:
        runs.say(f"streaming {len(dataset.urls)} shards ({cfg.pairs} pairs, {'filter by ' + f['encoder'] if filtered else 'no filter'}, "
                 f"shuffle buffer {cfg.shuffle_buffer} items, {stream.WINDOW_SHARDS}-shard windows)")
    return dataset


def grid_inputs(dataset, cfg, device):
    """(what the model is conditioned on, the images shown in the grid's first column) for the grids."""
    if isinstance(dataset, stream.ShardStream):         # the first pages of the first shards
        try:
            cond, shown = (torch.stack(t).to(device) for t in zip(*dataset.preview(cfg.grid_images)))
        except ValueError as e:
            raise UserError(f"--data {cfg.data}: {e}") from e
        return cond, shown
    cond = torch.stack([dataset[i][0] for i in range(cfg.grid_images)]).to(device)
    if not cfg.cond_cache:
        return cond, cond
    shown = [dataset.pages.image(p, c) for p, c, _ in map(dataset.pair, range(cfg.grid_images))]
    return cond, torch.stack(shown).to(device)


@torch.no_grad()
def variation_grid(ema, grid, cfg, d, step, autocast, logger):
    """Fig. 1 layout from the EMA: each conditioning image followed by grid_n variations."""
    if d.is_main or cfg.fsdp:  # FSDP: the sharded EMA's forward is a collective
        if cfg.fsdp:
            ema.unshard()  # sample() is not forward(): gather the root's parameters by hand
        cond, shown = grid
        with autocast:  # (B, n, 3, H, W); per-image noise from (seed, row, sample)
            samples = ema.sample(**{"cond" if cfg.cond_cache else "cond_images": cond}, num_samples=cfg.grid_n,
                                 steps=cfg.sample_steps, guidance=cfg.guidance, seed=cfg.seed,
                                 on_step=backends.xla_step_boundary if d.kind == "xla" else None)
        if cfg.fsdp:
            ema.reshard()
        if d.is_main:
            path = os.path.join(cfg.out, f"variations_{step:07d}.png")
            logger.image(step, images.save_grid(torch.cat([shown[:, None].to(samples.dtype), samples], 1), path))
            runs.say(f"wrote {path}")
    backends.barrier(d)


# ----------------------------------------------------------------------------- main

def main(cfg):
    """Train; -> dict(losses [(step, mean loss)], model, ema, step, dist, optimizer, stopped_by)."""
    # Set-up: the checks that need no model (runs.py), the process group, the checkpoint to resume.
    cfg = filter_band(cfg)
    runs.check_paths(cfg)
    d = backends.setup_distributed(cfg.device, cfg.backend)
    tell = runs.say if d.is_main else (lambda *a: None)  # rank 0 prints; the others stay silent
    path = os.path.join(cfg.out, runs.CKPT_NAME)
    ckpt = runs.load_checkpoint(path, cfg) if cfg.resume else None
    runs.check_stream_resume(ckpt, cfg, d)
    runs.check_world(ckpt, cfg, d)
    micro, accum = batch_plan(cfg, d.world)
    if cfg.fsdp and d.kind != "ddp":
        raise UserError("--fsdp needs a process group: launch with torchrun (--nproc_per_node=1 for one GPU)")
    start_step = ckpt["step"] if ckpt is not None else 0
    if d.is_main:
        tell(json.dumps(asdict(cfg)))
        tell(f"backend {d.kind}, device {d.device}, world {d.world}: global batch {cfg.batch} = micro-batch "
             f"{micro} x accumulation {accum} x world {d.world}; pair filter [{cfg.filter_low}, {cfg.filter_high}]")
    backends.cuda_speedups(d)

    # Model, EMA, optimiser: identical init on every rank (same seed), EMA from the unwrapped model, frozen
    # encoder; on --resume restored before wrapping, and the EMA is loaded, never re-synced (SiT bug).
    with backends.build_lock(d):
        torch.manual_seed(cfg.seed)
        encoder = load_frozen_encoder(cfg, ckpt["encoder"] if ckpt is not None else None)
        raw = build_model(cfg, encoder).to(d.device)
    raw.net.grad_checkpoint = cfg.grad_checkpoint
    header = semantica.checkpoint_header(raw)  # format, model config, p_uncond, encoder identity (hashed once)
    ema = raw.ema_copy()  # frozen, shares the encoder
    tell(f"denoiser parameters: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f} M")
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        tell(f"resumed {path} at step {start_step}")
    model = backends.wrap(raw, ema, cfg, d)
    opt = make_optimizer(cfg, raw.parameters(), d.device)  # §6.1
    if ckpt is not None:
        backends.load_optimizer(model, opt, ckpt["optimizer"], d)

    # Data: page pairs filtered with the frozen encoder (on d.device). Per-rank, infinite; each rank skips the
    # batches it consumed: step x accumulation. With the same world that is exact; resharded it continues from
    # the same number of global samples (step x batch). A stream continues from its recorded per-reader position
    # (no XLA device loader: it would read ahead); its refusals (no usable page, changed shards) come here.
    dataset, pages_id = build_dataset(cfg, raw.net.config.image_size, encoder, d, ckpt)
    header = {**header, "train_pages": pages_id} if pages_id else header  # train-only: the synthetic pages drawn
    data_position, streaming = start_step * accum, isinstance(dataset, stream.ShardStream)
    start = ckpt["data_position"]["ranks"][d.rank] if streaming and ckpt is not None else data_position
    try:
        loader = data.make_loader(dataset, micro, d.rank, d.world, cfg.seed, start=start, num_workers=cfg.num_workers)
    except ValueError as e:
        raise UserError(f"--data {cfg.data}: {e}") from e
    batches = iter(backends.xla_loader(loader, d) if d.kind == "xla" and not streaming else loader)
    grid = grid_inputs(dataset, cfg, d.device)
    # Inputs known good: only now does OUT get the run's files (a refused run leaves no folder, config or log).
    os.makedirs(cfg.out, exist_ok=True)
    window = ckpt.get("log_window") if ckpt is not None else None   # a log window cut short by a stop
    logger = runs.Logger(cfg, d, start_step, cut_window=window is not None)
    if d.is_main:
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=1)
    del ckpt

    # Loop: one optimiser step = `accum` micro-steps (Eq. 3 loss, backward), gradient reduction, Adam, EMA.
    amp = d.device.type in ("cuda", "xla") and cfg.bf16
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=amp)  # fp32 master weights
    gen = torch.Generator(d.device) if d.kind != "xla" else None  # XLA: the device RNG, seeded per step
    stop, old_handlers = runs.install_stop_handlers()
    running, n_running, t_last, step = torch.zeros((), device=d.device), 0, time.time(), start_step
    if window is not None:                                # the log rows of an uninterrupted run, after a stop
        running, n_running = torch.tensor(window[0], device=d.device), window[1]
    bar = runs.progress(cfg, d, start_step)
    try:
        while step < cfg.steps:
            for k in range(accum):
                try:
                    cond, x = (t.to(d.device, non_blocking=True) for t in next(batches))
                except stream.NoUsablePage as e:  # a stream with nothing to train on: one line, reasons logged
                    raise UserError(f"--data {cfg.data}: {e}") from e
                backends.seed_micro_step(gen, micro_step_seed(cfg.seed, d.rank, step, k), d)
                with backends.grad_sync(model, cfg, d, last=k == accum - 1), autocast:
                    loss = model(x, cond, generator=gen, sigmoid_bias=cfg.sigmoid_bias) / accum  # Eq. 3, eps space (§6.1)
                loss.backward()
                running += loss.detach()  # stays on the device: no host sync per step
            step, n_running, data_position = step + 1, n_running + 1, data_position + accum
            bar.update()
            stop_now = backends.poll_stop(stop, d, step, cfg)
            scheduled = step % cfg.log_every == 0 or step % cfg.ckpt_every == 0 or step == cfg.steps  # logged anyway
            save_now = step % cfg.ckpt_every == 0 or step == cfg.steps or stop_now
            log_now = scheduled or stop_now
            backends.reduce_gradients(opt, d)
            gnorm = backends.grad_norm(raw) if log_now else None  # of the averaged gradients, every backend
            backends.optimizer_step(opt, d)
            semantica.update_ema(ema, raw, cfg.ema_decay)  # every optimiser step, from the unwrapped model
            # a stop between log steps logs its partial window (the user sees the last loss) and keeps it in the
            # checkpoint: --resume replaces that row by the full window's, as an uninterrupted run logs it
            cut_window = (backends.mean_over_ranks(running.clone(), d).item(), n_running) \
                if stop_now and not scheduled else None
            if log_now:
                runs.report(logger, d, step, running, n_running, gnorm, time.time() - t_last)
                running, n_running, t_last = torch.zeros((), device=d.device), 0, time.time()
            if save_now:  # before the grid: nothing the grid does can cost the checkpoint
                position = runs.stream_position(loader, d) if streaming else data_position
                state = runs.checkpoint_state(cfg, d, header, model, ema, opt, step, position, cut_window)
                backends.save_checkpoint(path, state, d)
                tell(f"saved {path} at step {step}" + (f"; {stream.summary(position['ranks'])}" if streaming else ""))
            if step % cfg.sample_every == 0 or step == cfg.steps:
                variation_grid(ema, grid, cfg, d, step, autocast, logger)
            if stop_now:
                tell(f"stopped by signal {stop[0] if stop else '(on another rank)'} at step {step}")
                break
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if hasattr(batches, "close"):  # a generator (streaming): closing it drops its DataLoader iterator
            batches.close()
        del batches  # the DataLoader's worker processes end now, not whenever the garbage collector runs
    logger.close()
    return dict(losses=logger.losses, model=raw, ema=ema, step=step, dist=d, optimizer=opt,
                stopped_by=stop[0] if stop else None)


if __name__ == "__main__":
    flags.survive_lost_output()  # `| head`, a killed `| tee`: training goes on
    cfg = parse_args()
    try:
        if cfg.backend == "xla":  # one process per TPU device; XLA devices are touched only inside
            result = backends.xla_launch(main, cfg, runs.STOP)
        else:
            result = main(cfg)
    except UserError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if result.get("stopped_by"):
        sys.exit(128 + result["stopped_by"])  # shell convention for a run ended by a signal (saved first)
