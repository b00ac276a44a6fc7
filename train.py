"""Train Semantica: one straight-line script for one CPU, torchrun DDP/FSDP on GPUs, or torch_xla on TPUs.

Semantica (arXiv 2405.14857) §5-§6.1: an image-conditioned U-ViT diffusion model trained on pairs of
images from the same web page; frozen DINOv2 tokens condition the denoiser through cross-attention.
Recipe (§6.1): Adam (beta1 0.9, beta2 0.99, eps 1e-12), lr 2e-4, batch 2048, EMA ("Polyak
averaging") 0.9999, v-prediction with eps-space loss, ~300K steps; pairs filtered by encoder
cosine similarity in [0.3, 0.9] (§5, App. C).

    python train.py                                            # tiny-32 on synthetic pages, CPU, < 10 min
    python train.py --res 256 --data DIR --encoder-weights dinov2_vitb14_pretrain.pth   # §6.1 baseline
    torchrun --standalone --nproc_per_node=8 train.py --res 256 --data DIR --encoder-weights ...
    torchrun --standalone --nproc_per_node=8 train.py --res 512 --data DIR --encoder-weights ...  # FSDP
    PJRT_DEVICE=TPU python train.py --backend xla --res 256 ...          # torch_xla: UNTESTED here

Structure (distributed.md §1): setup -> seed -> encoder, model, EMA, optimiser -> resume -> wrap
(DDP / FSDP2 / none) -> data -> loop (step, log, grid, checkpoint) -> cleanup. Reference loops:
facebookresearch/DiT train.py @ed81ce2, karpathy/nanoGPT train.py @3adf61e.
Shapes: B batch, 3 x S x S images in [-1, 1].
Not implemented: precomputed encoder features (the paper precomputes them, §3.2; we run the frozen
encoder in the loop), learning-rate schedules (the paper states none), SPMD on TPU.
"""
import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

CKPT_NAME = "ckpt.pt"


@dataclass
class TrainConfig:
    res: int = 32                      # selects RES_PRESETS[res]; 32 = the CPU default job
    model: str = "sid-b-256"           # uvit.PRESETS name; §6.1 baseline U-ViT
    conditioning: str = "cross_attention"  # {cross_attention, film}; §6.2: cross-attention wins
    encoder: str = "dinov2-b14"        # encoders.ENCODER_PRESETS name; §6.1 baseline encoder
    encoder_weights: str = ""          # official checkpoint file (required for real encoders)
    random_encoder: bool = False       # allow a randomly initialised encoder (smoke runs only)
    data: str = "synthetic"            # folder, manifest (.jsonl/.csv) or "synthetic"
    pairs: str = "page"                # {page, same}: §5 page pairs; "same" = reconstruction (§4)
    num_pages: int = 2048              # synthetic pages only; DESIGN
    filter_low: float = 0.3            # §5, App. C: DINOv2 cosine-similarity lower threshold
    filter_high: float = 0.9           # §5, App. C: upper threshold (drops near-duplicates)
    steps: int = 300_000               # §6.1: "around 300K steps"
    batch: int = 2048                  # §6.1: global batch = micro_batch x accumulation x world
    micro_batch: int = 0               # per-device batch per forward; 0 = batch // world (no accumulation)
    lr: float = 2e-4                   # §6.1
    beta1: float = 0.9                 # §6.1
    beta2: float = 0.99                # §6.1
    adam_eps: float = 1e-12            # §6.1
    ema_decay: float = 0.9999          # §6.1 "Polyak averaging with a decay factor of 0.9999"
    p_uncond: float = 0.1              # INTERPRETATION: condition dropout for guidance (not stated)
    guidance: float = 0.5              # §6.1: guidance for ablations (used for the grids)
    sample_steps: int = 256            # DESIGN: DDPM steps for the periodic variation grids
    grid_images: int = 4               # conditioning images in a grid (rows)
    grid_n: int = 6                    # variations per conditioning image (columns after the condition)
    seed: int = 0
    out: str = "runs/tiny"
    resume: bool = False               # continue from OUT/ckpt.pt (model, EMA, optimiser, step, RNG, data)
    log_every: int = 100
    ckpt_every: int = 5000
    sample_every: int = 20_000
    backend: str = "auto"              # {auto, single, ddp, xla}; auto = ddp under torchrun else single
    fsdp: bool = False                 # shard params/grads/optimiser with FSDP2 fully_shard (DDP backend)
    grad_checkpoint: bool = False      # recompute activations in the backward pass
    compile: bool = False              # torch.compile the denoiser
    bf16: bool = True                  # bf16 autocast on CUDA/XLA (fp32 master weights); CPU stays fp32
    num_workers: int = 4               # DataLoader workers per rank


# Applied before explicit flags (style.md C7). Unlisted fields keep the paper defaults above.
RES_PRESETS = {
    # DEVIATION: CPU default job. A 32 px model, a random tiny encoder and 512 synthetic pages so that
    # `python train.py` learns visibly in < 10 min on 2 cores: batch 32 instead of 2048, lr 1e-3, and
    # EMA 0.99 because the run is 600 steps (with 0.995 the EMA at step 350 still holds 0.995^350 = 17 %
    # of the random init and samples are noise, while the raw weights already draw objects).
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
RESUMABLE = {"steps", "resume", "log_every", "ckpt_every", "sample_every", "sample_steps", "grid_images",
             "grid_n", "compile", "grad_checkpoint", "num_workers", "out", "encoder_weights"}


def add_flags(parser, cls, defaults, choices=None):
    """One flag per dataclass field: type from the annotation, bools as --x/--no-x, tuples as lists."""
    for f in fields(cls):
        flag, default = "--" + f.name.replace("_", "-"), defaults[f.name]
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif f.type in (tuple, "tuple"):
            parser.add_argument(flag, nargs="+", default=default, help=f"default: {default}")
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(flag, type=typ, default=default, choices=(choices or {}).get(f.name),
                                help=f"default: {default}")
    return parser


def parse_args(argv=None):
    """Flags generated from TrainConfig; `--res` picks a RES_PRESETS entry applied before explicit flags."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--res", type=int, default=TrainConfig.res, choices=sorted(RES_PRESETS))
    res = pre.parse_known_args(argv)[0].res
    defaults = {**asdict(TrainConfig()), **RES_PRESETS[res], "res": res}
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    add_flags(parser, TrainConfig, defaults, CHOICES)
    return TrainConfig(**vars(parser.parse_args(argv)))  # unknown flags: argparse error, exit 2


# ----------------------------------------------------------------------------- distributed setup

@dataclass
class Dist:
    kind: str          # "single" | "ddp" | "xla"
    rank: int
    world: int
    local_rank: int
    device: torch.device
    is_main: bool


def setup_distributed(cfg):
    """One process, torchrun (NCCL on GPUs, gloo on CPU) or a torch_xla replica (distributed.md §1)."""
    kind = cfg.backend if cfg.backend != "auto" else ("ddp" if "RANK" in os.environ else "single")
    if kind == "xla":  # called inside torch_xla.launch's function
        import torch_xla
        import torch_xla.runtime as xr
        rank, world = xr.global_ordinal(), xr.world_size()
        return Dist("xla", rank, world, xr.local_ordinal(), torch_xla.device(), rank == 0)
    if kind == "single":
        device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        return Dist("single", 0, 1, 0, device, True)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)  # LOCAL_RANK, never the global rank (DiT #79)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    return Dist("ddp", rank, world, local_rank, device, rank == 0)


def batch_plan(cfg, world):
    """(micro_batch, accumulation): global batch = micro_batch x accumulation x world (§6.1: 2048)."""
    micro = cfg.micro_batch or cfg.batch // world
    if micro < 1 or cfg.batch % (micro * world):
        raise SystemExit(f"--batch {cfg.batch} must be divisible by --micro-batch {micro} x world {world}")
    return micro, cfg.batch // (micro * world)


@torch.no_grad()
def update_ema(ema, model, decay):
    """Polyak averaging (§6.1): ema <- decay * ema + (1 - decay) * model; buffers copied."""
    # One fused multi-tensor op instead of a Python loop of ~800 lerp_ launches (sid-b-256).
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


# ----------------------------------------------------------------------------- model, data, grids

OFFICIAL_FILES = {  # what --encoder-weights expects (encoders.py docstring)
    **{f"dinov2-{s}14{r}": f"dinov2_vit{s}14{'_reg4' if r else ''}_pretrain.pth" for s in "sblg" for r in ("", "-reg")},
    **{f"siglip-{s}16-{r}": f"the Hugging Face folder google/siglip-{'base' if s == 'b' else 'large'}-patch16-{r}"
       for s in "bl" for r in (224, 256, 384, 512)},
}


def build_encoder(cfg, encoder_state=None):
    """The frozen encoder: official weights, or (tiny / --random-encoder) a seeded random init."""
    import encoders
    if cfg.encoder_weights:
        return encoders.load_encoder(cfg.encoder, weights=cfg.encoder_weights)
    if not cfg.random_encoder and encoder_state is None:
        name = OFFICIAL_FILES.get(cfg.encoder, f"the official checkpoint of {cfg.encoder}")
        raise SystemExit(
            f"--encoder {cfg.encoder} needs its pretrained weights: download {name} (DINOv2: "
            f"https://github.com/facebookresearch/dinov2#pretrained-models) and pass --encoder-weights PATH. "
            f"A random encoder would silently train a meaningless model; --random-encoder allows smoke runs.")
    encoder = encoders.load_encoder(cfg.encoder, seed=cfg.seed)  # deterministic: identical on every rank
    if encoder_state is not None:  # random encoders are stored in the checkpoint, so sample.py gets the same
        encoder.load_state_dict(encoder_state)
    return encoder


def build_model(cfg, encoder):
    """Semantica = frozen encoder + U-ViT denoiser sized by the preset, conditioned on the encoder."""
    import semantica
    import uvit
    net_cfg = dataclasses.replace(uvit.PRESETS[cfg.model], conditioning=cfg.conditioning,
                                  cond_dim=encoder.dim)
    spec = {"name": cfg.encoder, "weights": cfg.encoder_weights or None}
    return semantica.Semantica(net_cfg, encoder=encoder, p_uncond=cfg.p_uncond, encoder_spec=spec)


def build_dataset(cfg, image_size, encoder, d):
    """(cond, target) pairs from pages (§5), similarity-filtered with the frozen encoder (App. C)."""
    import data
    pages, skipped = data.open_pages(cfg.data, image_size, **(
        dict(num_pages=cfg.num_pages, seed=cfg.seed) if cfg.data == "synthetic" else {}))
    pairs = None
    if cfg.pairs == "page" and (cfg.filter_low > -1 or cfg.filter_high < 1):
        for turn in ((0, 1) if d.world > 1 and d.kind == "ddp" else (0,)):  # rank 0 fills the cache first
            if (d.rank == 0) == (turn == 0):
                pairs, report = data.build_pairs(pages, encoder, os.path.join(cfg.out, "cache"),
                                                 cfg.filter_low, cfg.filter_high, seed=cfg.seed)
            if d.kind == "ddp":
                dist.barrier()
        if d.is_main:
            print({k: v for k, v in report.items() if k != "histogram"}, "\n" + report["histogram"])
    if d.is_main and skipped:
        print(f"skipped {len(skipped)} unreadable files, e.g. {next(iter(skipped.items()))}")
    return data.PagePairs(pages, mode=cfg.pairs, pairs=pairs, seed=cfg.seed)


def save_grid(rows, path):
    """rows: (R, C, 3, H, W) in [-1, 1] -> one PNG, R rows x C columns, 2 px white gaps."""
    rows = ((rows.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    r, c, _, h, w = rows.shape
    canvas = np.full((r * (h + 2) + 2, c * (w + 2) + 2, 3), 255, np.uint8)
    for i in range(r):
        for j in range(c):
            canvas[2 + i * (h + 2):2 + i * (h + 2) + h, 2 + j * (w + 2):2 + j * (w + 2) + w] = \
                rows[i, j].permute(1, 2, 0).numpy()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(canvas).save(path)


@torch.no_grad()
def variation_grid(model, cond_images, n, steps, guidance, seed, path, autocast):
    """Fig. 1 layout: each conditioning image followed by n variations (EMA weights)."""
    g = torch.Generator(cond_images.device).manual_seed(seed)
    with autocast:
        samples = model.sample(cond_images, n, steps=steps, guidance=guidance, generator=g)  # (B, n, 3, H, W)
    save_grid(torch.cat([cond_images[:, None].to(samples.dtype), samples], 1), path)


# ----------------------------------------------------------------------------- checkpoints

def _sd_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def save_checkpoint(path, d, cfg, model, ema, opt, step, data_position, encoder_state):
    """Full (unsharded) state of the unwrapped model, EMA and optimiser; written atomically by rank 0.

    Every rank must call this: under FSDP gathering the full state is a collective.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    if d.kind == "xla":
        msd, esd, osd = model.state_dict(), ema.state_dict(), opt.state_dict()
    else:  # plain, DDP or FSDP2 modules: FQN keys without "module." / "_orig_mod." prefixes
        msd = get_model_state_dict(model, options=_sd_options(cpu_offload=True))
        esd = get_model_state_dict(ema, options=_sd_options(cpu_offload=True))
        osd = get_optimizer_state_dict(model, opt, options=_sd_options(cpu_offload=True))
    state = dict(model=msd, ema=esd, opt=osd, step=step, data_position=data_position, world=d.world,
                 cfg=asdict(cfg), encoder_state=encoder_state, rng={"torch": torch.get_rng_state()})
    tmp = path + ".tmp"
    if d.kind == "xla":
        import torch_xla.core.xla_model as xm
        xm.save(state, tmp, global_master=True)  # every replica calls it (it syncs), the master writes
        if d.is_main:
            os.replace(tmp, path)
        xm.rendezvous("ckpt")
    else:
        if d.is_main:
            torch.save(state, tmp)
            os.replace(tmp, path)  # atomic: a crash mid-write leaves the previous checkpoint intact
        if d.kind == "ddp":
            dist.barrier()


def load_checkpoint(path, cfg=None):
    """Load a train.py checkpoint on CPU; with cfg, refuse one written by an incompatible config."""
    if not os.path.isfile(path):
        raise SystemExit(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: ranks share pages
    except Exception as e:  # truncated / not a torch file
        raise SystemExit(f"{path} is not a readable train.py checkpoint: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or not {"model", "ema", "cfg", "step"} <= set(ckpt):
        raise SystemExit(f"{path} is not a train.py checkpoint (expected keys model, ema, cfg, step)")
    if cfg is not None:
        diff = {k: (v, getattr(cfg, k, None)) for k, v in ckpt["cfg"].items()
                if k not in RESUMABLE and v != getattr(cfg, k, None)}
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise SystemExit(f"{path} was written by another config ({lines}); use another --out "
                             f"or the same flags")
    return ckpt


# ----------------------------------------------------------------------------- main

def main(cfg):
    d = setup_distributed(cfg)
    micro, accum = batch_plan(cfg, d.world)
    if cfg.fsdp and d.kind != "ddp":
        raise SystemExit("--fsdp needs a process group: launch with torchrun (--nproc_per_node=1 for one GPU)")
    say = print if d.is_main else (lambda *a, **k: None)
    path = os.path.join(cfg.out, CKPT_NAME)
    ckpt = load_checkpoint(path, cfg) if cfg.resume else None
    if ckpt is not None and ckpt["world"] != d.world:
        raise SystemExit(f"{path} was written with world size {ckpt['world']}, now {d.world}: the data "
                         f"position is per rank, so an exact resume needs the same world size")
    if d.is_main:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=1)
    say(json.dumps(asdict(cfg)))
    if cfg.res != 32 and cfg.data == "synthetic":
        say(f"WARNING: --res {cfg.res} on synthetic pages is a smoke run; pass --data DIR for the paper's setup")
    say(f"backend {d.kind}, device {d.device}, world {d.world}: global batch {cfg.batch} = micro-batch "
        f"{micro} x accumulation {accum} x world {d.world}")
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: faster; may shift metrics slightly
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest conv kernels

    # Build: identical init on every rank (same seed), EMA from the unwrapped model, frozen encoder.
    torch.manual_seed(cfg.seed)
    encoder_state = None if cfg.encoder_weights else (ckpt or {}).get("encoder_state")
    encoder = build_encoder(cfg, encoder_state)
    if not cfg.encoder_weights and encoder_state is None:
        encoder_state = {k: v.clone() for k, v in encoder.state_dict().items()}  # random encoders travel along
    raw = build_model(cfg, encoder)
    raw.to(d.device)  # Semantica.to also moves its (unregistered) encoder
    dataset = build_dataset(cfg, raw.net.config.image_size, encoder, d)  # filtering runs on d.device
    if cfg.grad_checkpoint:
        raw.net.grad_checkpoint = True
    ema = copy.deepcopy(raw).eval().requires_grad_(False)  # Semantica.__deepcopy__ shares the frozen encoder
    say(f"denoiser parameters: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f} M")
    start_step = 0
    if ckpt is not None:  # restore before wrapping; the EMA is loaded, never re-synced (SiT bug)
        raw.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        start_step = ckpt["step"]
        say(f"resumed {path} at step {start_step}")

    # Wrap: DDP (gradient all-reduce), FSDP2 (sharded params/grads/optimiser), or none (single, XLA).
    model = raw
    if cfg.compile:
        raw.net.compile()  # in place: state_dict keys keep their names (no "_orig_mod.")
    if d.kind == "xla":
        import torch_xla.core.xla_model as xm
        xm.broadcast_master_param(raw)  # TPU v2/v3: threads share the RNG, so init may differ
    elif cfg.fsdp:
        from torch.distributed.fsdp import fully_shard
        import uvit
        for m in (raw, ema):  # the same sharding for both, so the EMA lerp stays shard-local
            for block in m.net.modules():  # one FSDP unit per block, then the rest at the root
                if isinstance(block, (uvit.ResBlock, uvit.TransformerBlock)):
                    fully_shard(block)
            fully_shard(m)
    elif d.kind == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(
            raw, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    opt = torch.optim.Adam(raw.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                           fused=d.device.type == "cuda")  # §6.1
    if ckpt is not None:
        if d.kind == "xla":
            opt.load_state_dict(ckpt["opt"])
        else:
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
            set_optimizer_state_dict(model, opt, ckpt["opt"], options=_sd_options())

    # Data: per-rank, infinite, resumable at the number of batches this rank already consumed.
    import data
    data_position = ckpt["data_position"] if ckpt is not None else 0
    loader = data.make_loader(dataset, micro, d.rank, d.world, cfg.seed, start=data_position,
                              num_workers=cfg.num_workers)
    if d.kind == "xla":
        import torch_xla.distributed.parallel_loader as pl
        loader = pl.MpDeviceLoader(loader, d.device)
    batches = iter(loader)
    grid_cond = torch.stack([dataset[i][0] for i in range(cfg.grid_images)]).to(d.device)
    del ckpt

    amp = d.device.type in ("cuda", "xla") and cfg.bf16
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=amp)  # fp32 master weights
    gen = torch.Generator(d.device) if d.kind != "xla" else None  # XLA: the device RNG, seeded per step
    stop = []  # signal received (SIGTERM from a scheduler, SIGINT from Ctrl-C): save, then exit
    old_handlers = {s: signal.signal(s, lambda sig, frame: stop.append(sig))
                    for s in (signal.SIGTERM, signal.SIGINT)}
    losses = []

    def log(step, running, n, seconds):
        """Mean loss since the last log line -> stdout and OUT/log.jsonl; a NaN/inf loss stops the run."""
        loss = running.item() / n
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step} (mean since step {step - n}); stopping. "
                                     f"The last good checkpoint is left untouched at {path}")
        losses.append((step, loss))
        img_s = n * cfg.batch / seconds
        rec = dict(step=step, loss=loss, lr=cfg.lr, img_per_s=img_s, eta_s=(cfg.steps - step) * cfg.batch / img_s)
        if d.is_main:
            with open(os.path.join(cfg.out, "log.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")
        say(f"step {step}/{cfg.steps}  loss {loss:.4f}  lr {cfg.lr:.2e}  {img_s:.1f} img/s  "
            f"ETA {datetime.timedelta(seconds=int(rec['eta_s']))}", flush=True)

    running, n_running, t_last = torch.zeros((), device=d.device), 0, time.time()
    step = start_step
    try:
        while step < cfg.steps:
            for k in range(accum):
                cond, x = (t.to(d.device, non_blocking=True) for t in next(batches))
                # Per-rank, per-step seeds for t, eps and condition dropout: resuming at step s replays
                # exactly what an uninterrupted run draws at step s, whatever happened before.
                micro_seed = ((cfg.seed * d.world + d.rank) * 1_000_003 + step) * 64 + k
                if d.kind == "xla":
                    xm.set_rng_state(micro_seed)
                else:
                    gen.manual_seed(micro_seed)
                    torch.manual_seed(micro_seed)  # dropout layers use the global generator
                last = k == accum - 1
                if cfg.fsdp:
                    model.set_requires_gradient_sync(last)  # FSDP2: reduce-scatter on the last micro-step
                sync = model.no_sync() if d.kind == "ddp" and not cfg.fsdp and not last else contextlib.nullcontext()
                with sync, autocast:
                    loss = model(x, cond, generator=gen) / accum  # Eq. 3 in eps space (§6.1)
                loss.backward()
                running += loss.detach()  # stays on the device: no host sync per step
            if d.kind == "xla":
                xm.optimizer_step(opt)  # all-reduce gradients (mean over replicas), then Adam
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            update_ema(ema, raw, cfg.ema_decay)  # every optimiser step, from the unwrapped model
            step += 1
            n_running += 1
            data_position += accum
            if d.kind == "ddp" and (step % 10 == 0 or step == cfg.steps):
                # Every rank must leave at the same step; polled every 10 steps (a host sync).
                flag = torch.tensor(float(bool(stop)), device=d.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop_now = flag.item() > 0
            elif d.kind == "ddp":
                stop_now = False
            else:
                stop_now = bool(stop)
            save_now = step % cfg.ckpt_every == 0 or step == cfg.steps or stop_now
            if step % cfg.log_every == 0 or save_now:
                if d.kind == "ddp":
                    dist.all_reduce(running, op=dist.ReduceOp.SUM)
                    running /= d.world
                if d.kind == "xla":  # read the loss after the step's graph ran: no host sync inside it
                    xm.add_step_closure(log, args=(step, running, n_running, time.time() - t_last))
                else:
                    log(step, running, n_running, time.time() - t_last)
                running, n_running, t_last = torch.zeros((), device=d.device), 0, time.time()
            if step % cfg.sample_every == 0 or step == cfg.steps:
                if d.is_main or cfg.fsdp:  # FSDP: the sharded EMA's forward is a collective
                    grid = os.path.join(cfg.out, f"variations_{step:07d}.png")
                    if cfg.fsdp:
                        ema.unshard()  # sample() is not forward(): gather the root's parameters by hand
                    variation_grid(ema, grid_cond, cfg.grid_n, cfg.sample_steps, cfg.guidance, cfg.seed,
                                   grid, autocast)
                    if cfg.fsdp:
                        ema.reshard()
                    say(f"wrote {grid}")
                if d.kind == "ddp":
                    dist.barrier()
            if save_now:
                save_checkpoint(path, d, cfg, model, ema, opt, step, data_position, encoder_state)
                say(f"saved {path} at step {step}")
            if stop_now:
                say(f"stopped by signal {stop[0] if stop else '(on another rank)'} at step {step}")
                break
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
    return dict(losses=losses, model=raw, ema=ema, step=step, dist=d)


def _xla_main(index, cfg):
    main(cfg)


if __name__ == "__main__":
    cfg = parse_args()
    if cfg.backend == "xla":  # one process per TPU device; XLA devices are touched only inside
        import torch_xla
        torch_xla.launch(_xla_main, args=(cfg,))
    else:
        main(cfg)
        if dist.is_initialized():
            dist.destroy_process_group()
