"""Train Semantica: one straight-line script for one CPU, torchrun DDP/FSDP on GPUs, or torch_xla on TPUs.

Semantica (arXiv 2405.14857) §5-§6.1: an image-conditioned U-ViT diffusion model trained on pairs of
images from the same web page; frozen encoder tokens condition the denoiser through cross-attention.
Recipe (§6.1): Adam (beta1 0.9, beta2 0.99, eps 1e-12), lr 2e-4, batch 2048, EMA ("Polyak
averaging") 0.9999, v-prediction with eps-space loss, ~300K steps; pairs filtered by encoder
cosine similarity (§5, App. C: DINOv2 [0.3, 0.9], SigLIP/CLIP 0.65).

    python train.py                                            # tiny-32 on synthetic pages, CPU, < 10 min
    python train.py --res 256 --data DIR --encoder-weights dinov2_vitb14_pretrain.pth   # §6.1 baseline
    torchrun --standalone --nproc_per_node=8 train.py --res 256 --data DIR --encoder-weights ...
    torchrun --standalone --nproc_per_node=8 train.py --res 512 --data DIR --encoder-weights ...  # FSDP
    PJRT_DEVICE=TPU python train.py --backend xla --res 256 ...          # torch_xla
    python train.py --out runs/tiny --resume [--reshard]               # continue (another world size)

Structure (distributed.md §1, style.md C11): setup -> seed -> encoder, model, EMA, optimiser ->
resume -> wrap -> data -> loop (step, log, grid, checkpoint) -> cleanup, as in facebookresearch/DiT
train.py @ed81ce2 and karpathy/nanoGPT train.py @3adf61e. Each backend's differences (DDP, FSDP2,
torch_xla) sit in small functions of backends.py (`backends.wrap`, `backends.poll_stop`, ...), not in
branches through the loop; only the torch_xla launcher (it runs `main`) stays here.
Checkpoint: the one format of semantica.py ("semantica-ckpt/2", loaded by Semantica.from_checkpoint)
plus train-only keys (optimizer, world, data position).
Shapes: B batch, 3 x S x S images in [-1, 1].
Not implemented: learning-rate schedules (the paper states none), SPMD on TPU.
"""
import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from machinery import backends
import data
from pages import embeddings
import encoders
from pages import images
import semantica
from pages import shards
from pages import stream
import uvit

CKPT_NAME = "ckpt.pt"


@dataclass
class TrainConfig:
    # The end-of-line comment of each field is its --help text (config_help reads this source).
    res: int = 32                      # resolution preset (RES_PRESETS): 32 = the CPU default job, 256 / 512 = §6.1
    model: str = "sid-b-256"           # U-ViT preset (uvit.PRESETS); sid-b-256 is the §6.1 baseline
    conditioning: str = "cross_attention"  # cross_attention (encoder tokens) or film (global feature); §6.2: cross-attention wins
    encoder: str = "dinov2-b14"        # frozen encoder preset (encoders.ENCODER_PRESETS); dinov2-b14 is the §6.1 baseline
    encoder_weights: str = ""          # the encoder's official weight file (required for real encoders)
    random_encoder: bool = False       # allow a randomly initialised encoder (smoke runs only)
    data: str = "synthetic"            # image folder ROOT/<page>/<image>, manifest (.jsonl/.csv), "synthetic", or page shards 'DIR/{000000..000999}.tar' (streamed)
    cond_cache: str = ""               # precomputed conditioning (python data.py encode): train without running the encoder (§3.2); "shards": the tokens in the --data shards (data.py filter --image-size)
    pairs: str = "page"                # page: pairs from one web page (§5, Eq. 3); same: reconstruction (§4, Eq. 2)
    num_pages: int = 2048              # number of synthetic pages (DESIGN)
    filter_low: Optional[float] = None   # pair filter lower cosine threshold; default: the encoder's (App. C: DINOv2 0.3, SigLIP/CLIP 0.65); -1 with 1 = no filter
    filter_high: Optional[float] = None  # pair filter upper threshold (drops near-duplicates); default: the encoder's (App. C: 0.9)
    steps: int = 300_000               # optimiser steps (§6.1: "around 300K steps")
    batch: int = 2048                  # global batch = micro-batch x accumulation x world (§6.1: 2048)
    micro_batch: int = 0               # per-device batch per forward pass; 0 = batch / world (no accumulation)
    lr: float = 2e-4                   # Adam learning rate (§6.1)
    beta1: float = 0.9                 # Adam beta1 (§6.1)
    beta2: float = 0.99                # Adam beta2 (§6.1)
    adam_eps: float = 1e-12            # Adam epsilon (§6.1)
    ema_decay: float = 0.9999          # EMA decay (§6.1: "Polyak averaging with a decay factor of 0.9999")
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


# Applied before explicit flags (style.md C7). Unlisted fields keep the paper defaults above.
RES_PRESETS = {
    # DEVIATION: CPU default job. A 32 px model, a random tiny encoder and 512 synthetic pages so that
    # `python train.py` learns visibly in < 10 min on 2 cores: batch 32 instead of 2048, lr 1e-3, and
    # EMA 0.99 because the run is 600 steps (with 0.995 the EMA at step 350 still holds 0.995^350 = 17 %
    # of the random init and samples are noise, while the raw weights already draw objects). No filter.
    32: dict(model="tiny-32", encoder="tiny", random_encoder=True, num_pages=512, filter_low=-1.0,
             filter_high=1.0, steps=600, batch=32, lr=1e-3, ema_decay=0.99, sample_steps=64,
             log_every=25, ckpt_every=100, sample_every=300, num_workers=0, out="runs/tiny"),
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
           "backend": ("auto", "single", "ddp", "xla")}
# Fields that may change between a checkpoint and its resumption; any other difference is an error.
RESUMABLE = {"steps", "resume", "reshard", "log_every", "ckpt_every", "sample_every", "sample_steps",
             "grid_images", "grid_n", "compile", "grad_checkpoint", "num_workers", "max_pixels", "out", "encoder_weights",
             "tensorboard", "device", "cond_cache", "backend"}  # backend: check_world guards the world size
RESHARDABLE = {"micro_batch", "fsdp"}  # may also change with --reshard (another world size)


class UserError(ValueError):
    """A bad flag, input or output path: the CLI prints one line, argparse-style, and exits with status 2."""


def config_help(cls):
    """{field: help}: the end-of-line comment of each field in the dataclass source (the single source)."""
    with open(os.path.abspath(__file__)) as f:  # this file, not inspect.getsource: works under -m cProfile too
        src = f.read()
    src = src[src.index(f"class {cls.__name__}"):]
    return {m.group(1): m.group(2).strip() for m in
            re.finditer(r"^\s+(\w+):[^#\n]*#(.*)$", src[:src.index("\n\n\n")], re.MULTILINE)}


def device_flag(text):
    """--device value: "", cpu, cuda or cuda:N."""
    if not re.fullmatch(r"|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def add_flags(parser, cls, defaults, choices=None):
    """One flag per dataclass field: type from the annotation, bools as --x/--no-x, help from the comments."""
    helps = config_help(cls)
    for f in fields(cls):
        flag, default = "--" + f.name.replace("_", "-"), defaults[f.name]
        text = (helps.get(f.name, "") + (f" (default: {default})" if default is not None else "")).replace("%", "%%")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            typ = device_flag if f.name == "device" else float if f.type == Optional[float] else f.type
            parser.add_argument(flag, type=typ, default=default, choices=(choices or {}).get(f.name), help=text)
    return parser


def parse_args(argv=None):
    """Flags generated from TrainConfig; `--res` picks a RES_PRESETS entry applied before explicit flags."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--res", type=int, default=TrainConfig.res, choices=sorted(RES_PRESETS))
    res = pre.parse_known_args(argv)[0].res
    defaults = {**asdict(TrainConfig()), **RES_PRESETS[res], "res": res}
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n")[0], allow_abbrev=False)
    add_flags(parser, TrainConfig, defaults, CHOICES)
    cfg = TrainConfig(**vars(parser.parse_args(argv)))  # unknown flags: argparse error, exit 2
    problem = check_numbers(cfg)
    if problem:
        parser.error(problem)  # before any work: one line, exit 2
    return cfg


def check_numbers(cfg):
    """The first flag value nothing can be computed with, as a message (None when all are usable)."""
    for name in ("steps", "batch", "log_every", "ckpt_every", "sample_every", "sample_steps", "grid_images", "grid_n"):
        if getattr(cfg, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}"
    for name in ("micro_batch", "num_workers", "seed", "num_pages"):
        if getattr(cfg, name) < 0:
            return f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}"
    if cfg.seed > semantica.MAX_SEED:
        return f"--seed must be at most 2^63 - 1 = {semantica.MAX_SEED} (torch and numpy seeds are 64-bit), got {cfg.seed}"
    for name, low, high in (("lr", 0, math.inf), ("beta1", 0, 1), ("beta2", 0, 1), ("adam_eps", 0, math.inf),
                            ("ema_decay", 0, 1), ("p_uncond", 0, 1), ("guidance", -math.inf, math.inf),
                            ("filter_low", -1, 1), ("filter_high", -1, 1)):
        v = getattr(cfg, name)
        if v is not None and not (math.isfinite(v) and low <= v <= high and (name != "lr" or v > 0)):
            span = " > 0" if name == "lr" else "" if math.isinf(low) and math.isinf(high) else f" in [{low}, {high}]"
            return f"--{name.replace('_', '-')} must be a finite number{span}, got {v}"
    if cfg.max_pixels < -1:
        return f"--max-pixels must be -1 (Pillow's limit), 0 (none) or a pixel count, got {cfg.max_pixels}"
    if cfg.filter_low is not None and cfg.filter_high is not None and cfg.filter_low >= cfg.filter_high:
        return f"--filter-low {cfg.filter_low} must be below --filter-high {cfg.filter_high} (-1 and 1 = no filter)"
    return None


def filter_band(cfg):
    """cfg with the pair filter thresholds resolved: explicit flags, else the encoder's (App. C). UserError for
    a band pairs.check_band refuses (one flag given, the other's default on its wrong side)."""
    if cfg.filter_low is None or cfg.filter_high is None:
        try:
            low, high = data.filter_band(cfg.encoder)
        except (KeyError, ValueError) as e:
            raise UserError(f"no App. C filter band for --encoder {cfg.encoder} ({e}): pass --filter-low and "
                            f"--filter-high") from e
        cfg = dataclasses.replace(cfg, filter_low=low if cfg.filter_low is None else cfg.filter_low,
                                  filter_high=high if cfg.filter_high is None else cfg.filter_high)
    try:
        data.check_band(cfg.filter_low, cfg.filter_high)
    except ValueError as e:
        raise UserError(f"--filter-low/--filter-high: {e}") from e
    return cfg


def check_paths(cfg):
    """User errors found before any work: output folder, checkpoint vs --resume, inputs, optional packages."""
    path = os.path.join(cfg.out, CKPT_NAME)
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UserError(f"--out {cfg.out} is a file, not a folder")
    if cfg.resume and not os.path.isfile(path):
        raise UserError(f"--resume: no checkpoint at {path}")
    if not cfg.resume and os.path.exists(path):
        raise UserError(f"{path} exists: pass --resume to continue it, or choose a new --out")
    if cfg.reshard and not cfg.resume:
        raise UserError("--reshard only applies with --resume")
    for flag, value in (("--data", cfg.data), ("--encoder-weights", cfg.encoder_weights),
                        ("--cond-cache", cfg.cond_cache)):
        if value and value not in ("synthetic", "shards") and not shards.is_pattern(value) and not os.path.exists(value):
            raise UserError(f"{flag} {value}: no such file or folder")
    if cfg.encoder not in encoders.ENCODER_PRESETS and not cfg.encoder_weights:
        raise UserError(f"unknown --encoder {cfg.encoder}; presets: {', '.join(sorted(encoders.ENCODER_PRESETS))}")
    if cfg.model not in uvit.PRESETS:
        raise UserError(f"unknown --model {cfg.model}; presets: {', '.join(sorted(uvit.PRESETS))}")
    if not (cfg.resume or cfg.encoder_weights or cfg.random_encoder):
        name = encoders.OFFICIAL_FILES.get(cfg.encoder, f"the official checkpoint of {cfg.encoder}")
        raise UserError(
            f"--encoder {cfg.encoder} needs its pretrained weights: download {name} and pass --encoder-weights "
            f"PATH (a random encoder would silently train a meaningless model; --random-encoder allows smoke runs)")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {cfg.device}: CUDA is not available")
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:  # an optional extra
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard")
    if shards.is_pattern(cfg.data):  # page shards: probe for the first readable page (bounded), check its filter
        try:
            _, first = shards.first_page(shards.expand(cfg.data), shards.PROBE_SHARDS)
        except ValueError as e:
            raise UserError(f"--data {cfg.data}: {e}") from e
        f, band = first["meta"].get("filter") or {}, [cfg.filter_low, cfg.filter_high]
        if cfg.pairs == "page" and band != [-1, 1] and [f.get("low"), f.get("high")] != band:
            raise UserError(f"--data {cfg.data}: shards not filtered with {band} (found "
                            f"{[f['low'], f['high']] if f else 'no filter'}): run python data.py filter with that band, "
                            f"pass the shards' band, or train unfiltered with --filter-low -1 --filter-high 1")
    why = images.folder_error(cfg.out)                  # made once the inputs are known good (main)
    if why:
        raise UserError(f"--out {cfg.out}: {why}")


def max_pixels(flag):
    """--max-pixels -> images.py's max_pixels: None = Pillow's setting at call time, 0 = no limit."""
    return None if flag < 0 else flag


def say(*args):
    """print to stdout (above the progress bar); a closed pipe (`| head`, a killed `tee`) silences stdout
    instead of stopping the run."""
    try:
        tqdm.write(" ".join(map(str, args)), file=sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python docs' SIGPIPE recipe


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


# ----------------------------------------------------------------------------- torch_xla launch (backends.py: the rest)


def xla_launch(cfg):
    """Run main(cfg) in every torch_xla replica (torch_xla.launch: one process per TPU chip, or one for the
    CPU devices of PJRT_DEVICE=CPU, and one thread per device) -> dict(stopped_by).

    Signals reach a process's main thread only, and the replicas run in worker threads of child processes.
    So the handlers are installed here, in the launching process, and the children are forked: they inherit
    the handlers, which run in their main thread (waiting for the replica threads) and fill STOP, polled by
    the loop. A signal to this process only (a scheduler's SIGTERM) is forwarded to the children.
    """
    import multiprocessing
    import torch_xla

    def forward(sig, frame):
        STOP.append(sig)
        for child in multiprocessing.active_children():  # none inside a child
            os.kill(child.pid, sig)

    # DESIGN: on TPU a persistent compilation cache under OUT, so a resumed run (after a preemption) does not
    # recompile the step (minutes to half an hour for large models, pytorch/xla #5058); set
    # XLA_PERSISTENT_CACHE_PATH to share one between runs. XLA:CPU cannot load one ("Deserializing serialized
    # executable not supported"), so none there. UNTESTED on TPU.
    if os.environ.get("PJRT_DEVICE") == "TPU":
        os.environ.setdefault("XLA_PERSISTENT_CACHE_PATH", os.path.join(os.path.abspath(cfg.out), "xla_cache"))
    STOP.clear()
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:  # fork, not torch_xla's default spawn: a spawned child would not inherit the handlers
        torch_xla.launch(_xla_main, args=(cfg,), start_method="fork")
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return dict(stopped_by=STOP[0] if STOP else None)


def _xla_main(index, cfg):
    main(cfg)  # the return value would be pickled back to the launching process: drop it


# ----------------------------------------------------------------------------- model, data, grids

def load_frozen_encoder(cfg, identity=None):
    """The frozen encoder: rebuilt from a checkpoint's identity, or official weights, or (tiny /
    --random-encoder) a random init seeded by --seed, identical on every rank."""
    try:
        if identity is not None:
            return semantica.build_encoder(identity, weights=cfg.encoder_weights or None)
        if cfg.encoder_weights:
            return encoders.load_encoder(cfg.encoder, weights=cfg.encoder_weights)
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"encoder {cfg.encoder}: {e}") from e
    return encoders.load_encoder(cfg.encoder, seed=cfg.seed)  # --random-encoder (check_paths)


def build_model(cfg, encoder):
    """Semantica = frozen encoder + U-ViT denoiser sized by the preset, conditioned on the encoder."""
    net_cfg = dataclasses.replace(uvit.PRESETS[cfg.model], conditioning=cfg.conditioning,
                                  cond_dim=semantica.cond_width(encoder, cfg.conditioning))
    return semantica.Semantica(net_cfg, encoder=encoder, p_uncond=cfg.p_uncond)


def build_dataset(cfg, image_size, encoder, d):
    """(cond, target) pairs from pages (§5), similarity-filtered with the frozen encoder (App. C); with
    --cond-cache the conditions (and the filter's embeddings) come from the precomputed cache (§3.2).
    A missing or empty source, or a cache of other images or another encoder: UserError. Page shards
    (--data PATTERN.tar) are streamed instead (stream_dataset)."""
    if shards.is_pattern(cfg.data):
        return stream_dataset(cfg, image_size, encoder, d)
    cache, kind = cfg.cond_cache or None, "tokens" if cfg.conditioning == "cross_attention" else "global"  # §3.4
    if cache == "shards":
        raise UserError("--cond-cache shards reads tokens stored in page shards: --data must be a shard pattern")
    try:
        pages, skipped = data.open_pages(cfg.data, image_size, max_pixels=max_pixels(cfg.max_pixels), **(
            dict(num_pages=cfg.num_pages, seed=cfg.seed) if cfg.data == "synthetic" else {}))
        pairs = None
        if cfg.pairs == "page" and (cfg.filter_low > -1 or cfg.filter_high < 1):
            for turn in ((0, 1) if d.kind == "ddp" and d.world > 1 else (0,)):  # rank 0 fills the cache first
                if (d.rank == 0) == (turn == 0):
                    pairs, report = data.build_pairs(pages, encoder, os.path.join(cfg.out, "cache"), cfg.filter_low,
                                                     cfg.filter_high, seed=cfg.seed, cond_cache=cache)
                backends.barrier(d)
            if d.is_main:
                say({k: v for k, v in report.items() if k != "histogram"}, "\n" + report["histogram"])
        dataset = data.PagePairs(pages, mode=cfg.pairs, pairs=pairs, seed=cfg.seed, cond_cache=cache,
                                 cond_kind=kind, encoder=encoder)
    except (OSError, ValueError) as e:
        raise UserError(f"--data {cfg.data}{' --cond-cache ' + cache if cache else ''}: {e}") from e
    if d.is_main and skipped:
        say(f"skipped {len(skipped)} unreadable files, e.g. {next(iter(skipped.items()))}")
    return dataset


def stream_dataset(cfg, image_size, encoder, d):
    """Page shards streamed by every rank (stream.ShardStream). Nothing is listed or opened up front except
    the first readable page (shards.first_page; check_paths already refused a pattern without one and shards
    not filtered with the run's band), which says for --cond-cache shards whether its tokens are this
    encoder's at this size for cross-attention (§3.2; UserError naming what differs). An unfiltered run on
    shards that carry a filter result gets a warning (their kept pairs are not used, App. C)."""
    if d.kind == "xla" and d.world > 1:  # their positions would need a host-side gather (untested)
        raise UserError("page shards under --backend xla run on one device only for now (CPU_NUM_DEVICES=1 / "
                        "one TPU core); several replicas: write a folder or manifest source")
    filtered = cfg.pairs == "page" and (cfg.filter_low > -1 or cfg.filter_high < 1)
    tokens = cfg.cond_cache == "shards"
    try:
        dataset = stream.ShardStream(cfg.data, image_size, cfg.pairs, (cfg.filter_low, cfg.filter_high) if filtered
                                     else None, "tokens" if tokens else "pixels", cfg.seed, d.rank, d.world,
                                     cfg.shuffle_buffer, max_pixels(cfg.max_pixels))
        _, first = shards.first_page(dataset.urls, shards.PROBE_SHARDS, quiet=True)   # logged by check_paths
    except ValueError as e:
        raise UserError(f"--data {cfg.data}: {e}") from e
    f = first["meta"].get("filter") or {}
    if tokens:
        ident = lambda w, s: f"weights {w}" if w else f"random init, seed {s}" if s is not None else "weights unrecorded"  # noqa: E731
        size = f.get("token_size")
        problem = next((text for bad, text in (
            (not f, "the shards carry no filter result; tokens are stored by data.py filter --image-size "
                    f"{image_size}"),
            (cfg.conditioning != "cross_attention", f"--conditioning {cfg.conditioning} conditions on the global "
                                                    "feature, not on the stored tokens: drop --cond-cache shards"),
            (size is None, f"the shards hold no tokens (filtered without --image-size): re-run data.py filter "
                           f"--image-size {image_size}"),
            (size != image_size, f"the shards' tokens are at {size} px, this run trains at {image_size} px: re-run "
                                 f"data.py filter --image-size {image_size}"),
            (f.get("encoder") != encoder.name, f"the shards' tokens are {f.get('encoder')}'s, this run's encoder is "
                                               f"{encoder.name}"),
            (f.get("encoder_fingerprint") != embeddings.encoder_fingerprint(encoder),
             f"the shards' tokens come from another {encoder.name} (other weights: shards "
             f"{ident(f.get('encoder_weights'), f.get('encoder_seed'))}, this run {ident(encoder.weights, encoder.seed)})"),
        ) if bad), None)
        if problem:
            raise UserError(f"--cond-cache shards: {problem}")
    if d.is_main and f and not filtered and cfg.pairs == "page":
        say(f"warning: the shards carry a §5 filter result for [{f['low']}, {f['high']}] ({f['encoder']}), but this run "
            f"is unfiltered (band [{cfg.filter_low}, {cfg.filter_high}]): their kept pairs are not used; pass "
            f"--filter-low {f['low']} --filter-high {f['high']} to train on them")
    if d.is_main:
        say(f"streaming {len(dataset.urls)} shards ({cfg.pairs} pairs, {'filter by ' + f['encoder'] if filtered else 'no filter'}, "
            f"shuffle buffer {cfg.shuffle_buffer} items, {stream.WINDOW_SHARDS}-shard windows)")
    return dataset


def stream_position(loader, d):
    """The checkpoint's data position of a streaming run: every rank's StreamLoader.position() (a collective,
    every rank calls it) -> {"format", "world", "ranks": [...]}."""
    mine = loader.position()
    if d.kind == "ddp":
        ranks = [None] * d.world
        dist.all_gather_object(ranks, mine)
    else:  # one process (stream_dataset refuses several XLA replicas)
        ranks = [mine]
    return {"format": stream.FORMAT, "world": d.world, "ranks": ranks}


def check_stream_resume(ckpt, cfg, d):
    """A streaming run's readers, checked before anything is written or announced: one per (rank, worker), each
    owning shards, so there must be as many shards, and a run continues exactly (same world size and
    --num-workers) or not at all."""
    position = ckpt.get("data_position") if ckpt is not None else None
    workers = max(1, cfg.num_workers)
    if isinstance(position, dict) and position["world"] != d.world:
        raise UserError(f"cannot resume a streaming run with another world size (checkpoint {position['world']}, "
                        f"now {d.world}): its readers own shards by rank")
    if isinstance(position, dict) and position["ranks"][d.rank]["workers"] != workers:
        raise UserError(f"cannot resume a streaming run with another --num-workers (checkpoint "
                        f"{position['ranks'][d.rank]['workers']}, now {workers}): its readers own shards by worker")
    if shards.is_pattern(cfg.data) and len(shards.expand(cfg.data)) < d.world * workers:
        raise UserError(f"--data {cfg.data}: {len(shards.expand(cfg.data))} shards cannot feed {d.world * workers} "
                        f"readers (world {d.world} x {workers} workers): write smaller shards or use fewer workers")


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
            say(f"wrote {path}")
    backends.barrier(d)


# ----------------------------------------------------------------------------- checkpoints

def checkpoint_state(cfg, d, header, model, ema, opt, step, data_position, log_window=None):
    """The PLAN.md checkpoint (semantica-ckpt/2) of the unwrapped model + train-only keys. log_window: (loss sum,
    steps) of a log window a stop cut short, so that --resume logs the row an uninterrupted run would.

    Every rank must call this: under FSDP gathering the full state is a collective.
    """
    msd, esd, osd = backends.full_states(model, ema, opt, d)
    return {**header, "model": msd, "ema": esd, "step": step, "ema_decay": cfg.ema_decay, "train_config": asdict(cfg),
            # train-only: the optimiser, the world size, this rank's data position, global samples consumed
            "optimizer": osd, "world": d.world, "data_position": data_position, "samples": step * cfg.batch,
            "log_window": log_window}


def check_resume_pages(ckpt, cfg, dataset, tell):
    """Synthetic pages: their fingerprint (seed, count, drawing style) -> stored in the checkpoint. A resume on
    other synthetic pages (e.g. a run from before the one-large-object style) is a UserError; a checkpoint
    without the record only gets a warning (it cannot tell)."""
    if cfg.data != "synthetic":
        return None
    now = dataset.pages.fingerprint()
    if ckpt is not None:
        was = ckpt.get("train_pages")
        if was is None:
            tell("warning: the checkpoint does not record its synthetic pages (written before they were recorded); "
                 f"this run continues on {now}")
        elif was != now:
            raise UserError(f"--resume: the checkpoint was trained on other synthetic pages ({was}; now {now}); "
                            "start a new --out")
    return now


def load_checkpoint(path, cfg=None):
    """Load a train.py checkpoint on CPU; with cfg, refuse one written by an incompatible config."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: ranks share pages
    except FileNotFoundError as e:
        raise UserError(f"no checkpoint at {path}") from e
    except Exception as e:  # truncated / not a torch file
        raise UserError(f"{path} is not a readable checkpoint: {encoders.load_failure(e)}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != semantica.FORMAT or "optimizer" not in ckpt:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path} is not a resumable train.py checkpoint (format {semantica.FORMAT}; found {found})")
    if cfg is not None:
        ok = RESUMABLE | (RESHARDABLE if cfg.reshard else set())
        diff = {k: (v, getattr(cfg, k, None)) for k, v in ckpt["train_config"].items()
                if k not in ok and v != getattr(cfg, k, None)}
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise UserError(f"{path} was written by another config ({lines}); use another --out or the same flags")
    return ckpt


def check_world(ckpt, cfg, d):
    """Same world size: exact resume. Another one needs --reshard, and is then not bit-identical."""
    if ckpt is None or ckpt["world"] == d.world or not d.is_main and cfg.reshard:
        return
    if not cfg.reshard:
        raise UserError(f"checkpoint written with world size {ckpt['world']}, now {d.world}: pass --reshard "
                        f"to continue it (same global batch; not bit-identical to an uninterrupted run)")
    say(f"RESHARD: world size {ckpt['world']} -> {d.world}. Model, EMA, optimiser and step are restored and the "
        f"global batch stays {cfg.batch}, but the continuation is not bit-identical to an uninterrupted run: "
        f"each rank's shard of the data order and each rank's noise/timestep/dropout draws depend on the "
        f"rank and world size, and gradients are summed in another order.")


# ----------------------------------------------------------------------------- logging

class Logger:
    """log.jsonl (timestamped; truncated to the checkpoint's step on resume), stdout lines with a smoothed
    ETA, optional TensorBoard, and loss.png at the end. Only rank 0 writes."""

    def __init__(self, cfg, d, start_step, cut_window=False):
        """cut_window: the checkpoint carries the log window its stop cut short; that row is replaced."""
        self.cfg, self.on, self.start_step, self.t_start = cfg, d.is_main, start_step, time.time()
        self.path, self.tb, self.losses = os.path.join(cfg.out, "log.jsonl"), None, []
        if not self.on:
            return
        last = start_step - 1 if cut_window else start_step
        kept = [json.dumps(r) + "\n" for r in read_log(self.path) if r["step"] <= last]
        with open(self.path + ".tmp", "w") as f:  # --resume: drop the records of steps that will be replayed
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional extra, checked in check_paths
            self.tb = SummaryWriter(os.path.join(cfg.out, "tb"), purge_step=last + 1)

    def step(self, step, loss, gnorm, n_steps, seconds):
        """One log record: the mean loss of the last n_steps steps (host values)."""
        if not np.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step} (mean since step {step - n_steps}); stopping. "
                                     f"The last good checkpoint is left untouched in {self.cfg.out}")
        self.losses.append((step, loss))
        # ETA from the mean step time since this process started (smooth; not a window of recent steps)
        eta = (time.time() - self.t_start) / max(1, step - self.start_step) * (self.cfg.steps - step)
        rec = dict(step=step, loss=loss, lr=self.cfg.lr, grad_norm=gnorm, img_per_s=n_steps * self.cfg.batch / seconds,
                   eta_s=eta, time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   elapsed_s=time.time() - self.t_start)
        if not self.on:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        for k in ("loss", "lr", "grad_norm", "img_per_s"):
            self.tb and self.tb.add_scalar(f"train/{k}", rec[k], step)
        say(f"step {step}/{self.cfg.steps}  loss {loss:.4f}  grad {gnorm:.3g}  lr {self.cfg.lr:.2e}  "
            f"{rec['img_per_s']:.1f} img/s  ETA {datetime.timedelta(seconds=int(eta))}")

    def image(self, step, canvas):
        if self.tb:
            self.tb.add_image("variations", canvas, step, dataformats="HWC")

    def close(self):
        """loss.png of the whole run (from log.jsonl) when matplotlib is installed."""
        if not self.on:
            return
        if self.tb:
            self.tb.close()
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        recs = read_log(self.path)
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot([r["step"] for r in recs], [r["loss"] for r in recs])
        ax.set(xlabel="step", ylabel="loss (eps space, Eq. 3)", yscale="log")
        fig.tight_layout()
        fig.savefig(os.path.join(self.cfg.out, "loss.tmp.png"))
        plt.close(fig)
        os.replace(os.path.join(self.cfg.out, "loss.tmp.png"), os.path.join(self.cfg.out, "loss.png"))


def read_log(path):
    """The records of a log.jsonl (none if absent); a torn last line (a crash mid-write) is skipped."""
    if not os.path.exists(path):
        return []
    recs = []
    with open(path) as f:
        for line in f:
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return recs


def report(logger, d, step, running, n_steps, gnorm, seconds):
    """Hand the mean loss since the last report to the logger (XLA: after the step's graph ran)."""
    running = backends.mean_over_ranks(running, d)
    fn = lambda: logger.step(step, running.item() / n_steps, gnorm.item(), n_steps, seconds)  # noqa: E731
    backends.xla_report(fn, ()) if d.kind == "xla" else fn()


STOP = []  # signals received (SIGTERM from a scheduler, SIGINT from Ctrl-C): the loop saves, then exits


def install_stop_handlers():
    """SIGTERM and SIGINT append to STOP (-> STOP, the previous handlers). Python runs signal handlers in a
    process's main thread only; a torch_xla replica runs in a worker thread, so there nothing is installed
    and the loop reads the STOP that xla_launch's handlers (inherited by fork) fill."""
    if threading.current_thread() is not threading.main_thread():
        return STOP, {}
    STOP.clear()
    return STOP, {s: signal.signal(s, lambda sig, frame: STOP.append(sig)) for s in (signal.SIGTERM, signal.SIGINT)}


# ----------------------------------------------------------------------------- main

def main(cfg):
    """Train; -> dict(losses [(step, mean loss)], model, ema, step, dist, optimizer, stopped_by)."""
    cfg = filter_band(cfg)
    check_paths(cfg)
    d = backends.setup_distributed(cfg)
    tell = say if d.is_main else (lambda *a: None)  # rank 0 prints; the others stay silent
    path = os.path.join(cfg.out, CKPT_NAME)
    ckpt = load_checkpoint(path, cfg) if cfg.resume else None
    check_stream_resume(ckpt, cfg, d)
    check_world(ckpt, cfg, d)
    micro, accum = batch_plan(cfg, d.world)
    if cfg.fsdp and d.kind != "ddp":
        raise UserError("--fsdp needs a process group: launch with torchrun (--nproc_per_node=1 for one GPU)")
    start_step = ckpt["step"] if ckpt is not None else 0
    if d.is_main:
        tell(json.dumps(asdict(cfg)))
        tell(f"backend {d.kind}, device {d.device}, world {d.world}: global batch {cfg.batch} = micro-batch "
             f"{micro} x accumulation {accum} x world {d.world}; pair filter [{cfg.filter_low}, {cfg.filter_high}]")
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: faster; may shift metrics slightly
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest conv kernels

    # Build: identical init on every rank (same seed), EMA from the unwrapped model, frozen encoder.
    with backends.XLA_BUILD_LOCK if d.kind == "xla" else contextlib.nullcontext():  # XLA threads: the same init each run
        torch.manual_seed(cfg.seed)
        encoder = load_frozen_encoder(cfg, ckpt["encoder"] if ckpt is not None else None)
        raw = build_model(cfg, encoder).to(d.device)
    dataset = build_dataset(cfg, raw.net.config.image_size, encoder, d)  # filtering runs on d.device
    pages_id = check_resume_pages(ckpt, cfg, dataset, tell)
    # Inputs known good: only now does OUT get the run's files (a refused run leaves no folder, config or log).
    os.makedirs(cfg.out, exist_ok=True)
    window = ckpt.get("log_window") if ckpt is not None else None   # a log window cut short by a stop
    logger = Logger(cfg, d, start_step, cut_window=window is not None)
    if d.is_main:
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=1)
    raw.net.grad_checkpoint = cfg.grad_checkpoint
    header = semantica.checkpoint_header(raw)  # format, model config, p_uncond, encoder identity (hashed once)
    header = {**header, "train_pages": pages_id} if pages_id else header  # train-only: the synthetic pages drawn
    ema = raw.ema_copy()  # frozen, shares the encoder
    tell(f"denoiser parameters: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f} M")
    if ckpt is not None:  # restore before wrapping; the EMA is loaded, never re-synced (SiT bug)
        raw.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        tell(f"resumed {path} at step {start_step}")

    model = backends.wrap(raw, ema, cfg, d)
    opt = make_optimizer(cfg, raw.parameters(), d.device)  # §6.1
    if ckpt is not None:
        backends.load_optimizer(model, opt, ckpt["optimizer"], d)

    # Data: per-rank, infinite; each rank skips the batches it consumed: step x accumulation. With the
    # same world that is exact; resharded it continues from the same number of global samples (step x batch).
    # A stream continues from its recorded per-reader position (no XLA device loader: it would read ahead).
    data_position, streaming = start_step * accum, isinstance(dataset, stream.ShardStream)
    start = ckpt["data_position"]["ranks"][d.rank] if streaming and ckpt is not None else data_position
    try:
        loader = data.make_loader(dataset, micro, d.rank, d.world, cfg.seed, start=start, num_workers=cfg.num_workers)
    except ValueError as e:
        raise UserError(f"--data {cfg.data}: {e}") from e
    batches = iter(backends.xla_loader(loader, d) if d.kind == "xla" and not streaming else loader)
    grid = grid_inputs(dataset, cfg, d.device)
    del ckpt

    amp = d.device.type in ("cuda", "xla") and cfg.bf16
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=amp)  # fp32 master weights
    gen = torch.Generator(d.device) if d.kind != "xla" else None  # XLA: the device RNG, seeded per step
    stop, old_handlers = install_stop_handlers()
    running, n_running, t_last, step = torch.zeros((), device=d.device), 0, time.time(), start_step
    if window is not None:                                # the log rows of an uninterrupted run, after a stop
        running, n_running = torch.tensor(window[0], device=d.device), window[1]
    # progress between log lines (stderr; rank 0): steps, rate and ETA; redrawn every 60 s into a log file
    bar = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step", disable=not d.is_main,
               mininterval=1 if sys.stderr.isatty() else 60, dynamic_ncols=True)
    try:
        while step < cfg.steps:
            for k in range(accum):
                try:
                    cond, x = (t.to(d.device, non_blocking=True) for t in next(batches))
                except stream.NoUsablePage as e:  # a stream with nothing to train on: one line, reasons logged
                    raise UserError(f"--data {cfg.data}: {e}") from e
                backends.seed_micro_step(gen, micro_step_seed(cfg.seed, d.rank, step, k), d)
                with backends.grad_sync(model, cfg, d, last=k == accum - 1), autocast:
                    loss = model(x, cond, generator=gen) / accum  # Eq. 3 in eps space (§6.1)
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
                report(logger, d, step, running, n_running, gnorm, time.time() - t_last)
                running, n_running, t_last = torch.zeros((), device=d.device), 0, time.time()
            if save_now:  # before the grid: nothing the grid does can cost the checkpoint
                position = stream_position(loader, d) if streaming else data_position
                state = checkpoint_state(cfg, d, header, model, ema, opt, step, position, cut_window)
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
    cfg = parse_args()
    try:
        if cfg.backend == "xla":  # one process per TPU device; XLA devices are touched only inside
            result = xla_launch(cfg)
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
