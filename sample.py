"""Sample image variations from a checkpoint, and run the K-shot evaluation of §7/§8.

Semantica (arXiv 2405.14857): Fig. 1 (each conditioning image followed by its variations), Fig. 14
(one column block per guidance factor, 0.0-1.0), §7 (K-shot FID / precision / recall: N test images,
K conditioning images picked at random, N/K samples each), §8.2 and App. F (alignment of each sample
with its conditioning image in CLIP B/16 and DINOv2 space), App. H (FID per guidance).

    python sample.py --ckpt runs/tiny/ckpt.pt --images A.png B.jpg --n 8 --guidance 0.5 --out grid.png
    python sample.py --ckpt CKPT --images A.png --n 1 --guidance 0,0.1,0.2,0.5,1.0 --out fig14.png
    python sample.py --ckpt CKPT --few-shot 1 --data DIR --per-group 10 --guidance 0,0.5,1 --out eval/ \
        --features inception --feature-weights pt_inception-2015-12-05-6726825d.pth \
        --alignment dinov2-b14=dinov2_vitb14_pretrain.pth,clip-b16=clip-vit-base-patch16/    # the paper's networks
    torchrun --nproc_per_node=8 sample.py --few-shot 1 ...      # the same numbers, split over 8 processes

The model comes from `Semantica.from_checkpoint` (EMA weights unless --no-ema). Sampling: DDPM with
gamma 0.2 and guidance (1 + w) v_cond - w v_null (diffusion.py). A grid has a header row naming each
guidance block; its samples are also saved one by one in OUT_STEM/img{i}_w{w}_s{j}.png.
DESIGN (noise): sample j of image k (grid: the k-th --images file; K-shot: the k-th conditioning image
of the plan) gets its noise from (seed, k, j) alone, through Semantica.sample's first_index / first_sample,
and the same noise for every guidance value; so any --batch, any split of one image's samples across
calls, any number of processes and a resumed run give the same images: exactly on CPUs; on GPUs up to float
rounding (TF32 convolutions, kernels picked by shape), and --deterministic makes reruns bit-identical there.
K-shot samples on disk (OUT/samples_w{w}/cond{test image}_s{j}.png) are read back instead of redrawn when
the weights are the same (their fingerprint); features are always taken from the 8-bit images as written,
so a resumed run gives the same numbers. Reports say in one line when their networks are not the paper's
(Inception-v3 for FID, §7; CLIP B/16 and DINOv2 B for alignment, §8.2). Bookkeeping: machinery/sample_runs.py.
"""
import argparse
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont

from machinery import backends, flags, runs, sample_runs
import data
from pages import images
import diffusion
import encoders
import metrics
from semantica import Semantica


@dataclass
class SampleConfig:
    ckpt: str = ""                     # checkpoint written by train.py (OUT/ckpt.pt)
    images: tuple = ()                 # conditioning images of a grid (Fig. 1 / Fig. 14 layout)
    n: int = 8                         # variations per image and guidance value (Fig. 1: 8)
    guidance: tuple = (diffusion.GUIDANCE,)  # guidance w, one or several (0,0.5,1); §6.1: 0.5; Fig. 14: 0,0.1,0.2,0.5,1
    steps: int = 256                   # DDPM steps (DESIGN: the paper does not state them)
    gamma: float = diffusion.GAMMA     # DDPM variance interpolation in [0, 1]; §6.1: 0.2
    seed: int = 0                      # seed of the noise (sample j of image i: (seed, i, j), the same for every w) and of the K-shot picks
    out: str = "grid.png"              # grid image (.png, .jpg, ...), or the output folder with --few-shot
    few_shot: int = 0                  # K > 0: K-shot evaluation on --data (§7): K conditioning images per page/class
    data: str = ""                     # test images: ROOT/<page or class>/<image>, a .csv/.jsonl manifest, or synthetic
    per_group: int = 0                 # test images drawn per page/class (§8.2: 10 per ImageNet class); 0 = all
    features: str = "encoder"          # FID/P/R features: encoder (the checkpoint's; DESIGN: needs no weight file, not the paper's), inception (§7, the paper's FID), or an encoders.py name
    feature_weights: str = ""          # weights file of --features (inception: pt_inception-2015-12-05-6726825d.pth)
    alignment: str = "encoder"         # alignment spaces NAME=WEIGHTS,...; encoder = the checkpoint's (DESIGN: needs no weight file); the paper's (§8.2): dinov2-b14=PATH,clip-b16=PATH
    encoder_weights: str = ""          # the checkpoint's encoder weights, where they are not at the stored path
    encoder_act: str = ""              # MLP activation of the clip-* files of --features / --alignment that do not record it (OpenCLIP visual.* state dicts): quick_gelu (OpenAI weights) or gelu (LAION, DataComp); none: from the file
    ema: bool = True                   # sample from the EMA weights (--no-ema: the raw weights)
    batch: int = 64                    # samples per sampling call (with guidance the network sees at most 2x)
    device: str = ""                   # cpu, cuda, cuda:1; default cuda when available (torchrun: cuda:LOCAL_RANK)
    deterministic: bool = False        # GPUs: no TF32, deterministic kernels (slower): a rerun gives bit-identical samples and numbers
    max_pixels: int = -1               # decompression-bomb limit per image in pixels; -1 = Pillow's Image.MAX_IMAGE_PIXELS at call time, 0 = no limit


# ------------------------------------------------------------------------------------ arguments
TYPES = {"n": flags.number(int, 1), "steps": flags.number(int, 1), "gamma": flags.number(float, 0.0, 1.0),
         "batch": flags.number(int, 1), "few_shot": flags.number(int, 1), "per_group": flags.number(int, 0),
         "seed": flags.number(int, 0), "guidance": flags.numbers}


def parse_args(argv=None):
    """Flags from SampleConfig (help = the field comments); numbers and --out are checked here, before
    any model is loaded. Errors: argparse's one-line message, exit 2."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    flags.add_flags(parser, SampleConfig, os.path.abspath(__file__), vars(SampleConfig()),
                    {"encoder_act": encoders.CLIP_ACTIVATIONS}, TYPES)
    args = vars(parser.parse_args(argv))
    if args["guidance"] is not SampleConfig.guidance:  # nargs="+" of comma lists -> one flat tuple
        args["guidance"] = tuple(v for vs in args["guidance"] for v in vs)
    cfg = SampleConfig(**{**args, "images": tuple(args["images"])})
    problem = sample_runs.check_config(cfg)
    if problem:
        parser.error(problem)  # before any model loads: one line, exit 2
    return cfg


def fail(message):
    """A user error: one line on stderr, exit status 2 (argparse's convention)."""
    print(f"sample.py: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# ------------------------------------------------------------------------------- model, sampling
def load_model(cfg, device):
    """Semantica.from_checkpoint (the one loader); a bad file or a missing weight file is a user error."""
    try:
        return Semantica.from_checkpoint(cfg.ckpt, ema=cfg.ema, device=device,
                                         encoder_weights=cfg.encoder_weights or None)
    except (OSError, ValueError, KeyError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(message if cfg.ckpt in message else f"{cfg.ckpt}: {message}")


def calls(rows):
    """[(k, s)] (image k's sample s), image-major -> [([k0, k0 + 1, ...], s0, m)]: runs of consecutive images
    that all need samples s0 .. s0 + m - 1, one Semantica.sample call each."""
    spans, groups = [], []
    for k, s in rows:
        if spans and spans[-1][0] == k and spans[-1][1] + spans[-1][2] == s:
            spans[-1][2] += 1
        else:
            spans.append([k, s, 1])
    for k, s0, m in spans:
        if groups and groups[-1][1:] == [s0, m] and groups[-1][0][-1] == k - 1:
            groups[-1][0].append(k)
        else:
            groups.append([[k], s0, m])
    return groups


def draw(model, rows, cond_of, guidance, cfg, device):
    """Samples of rows [(k, s)] (at most --batch: the network sees at most 2 x --batch with guidance)
    -> quantized (len(rows), 3, S, S) on the CPU. cond_of([k, ...]) gives those conditioning images."""
    out = []
    for ks, s0, m in calls(rows):
        x = model.sample(cond_of(ks).to(device), num_samples=m, steps=cfg.steps, guidance=guidance, gamma=cfg.gamma,
                         seed=cfg.seed, first_index=ks[0], first_sample=s0)     # (len(ks), m, 3, S, S)
        out.append(sample_runs.quantize(x.flatten(0, 1)).cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------- grids
def grid(cfg, model, device):
    """Fig. 1 / Fig. 14: per conditioning image the image, then n samples per guidance value."""
    size = model.config.image_size
    cond = []
    for path in cfg.images:
        try:
            cond.append(images.load_image(path, size, max_pixels=None if cfg.max_pixels < 0 else cfg.max_pixels))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            fail(f"cannot read conditioning image {path}: {type(e).__name__}: {e}")
    cond = torch.stack(cond).to(device)                                    # (B, 3, S, S)
    rows = [(i, j) for i in range(len(cond)) for j in range(cfg.n)]        # noise of sample j of image i: (seed, i, j)
    out = torch.empty(len(cond), len(cfg.guidance), cfg.n, 3, size, size)
    with sample_runs.progress(len(rows) * len(cfg.guidance), "sampling") as bar:
        for g, w in enumerate(cfg.guidance):
            for a in range(0, len(rows), cfg.batch):
                chunk = rows[a:a + cfg.batch]
                x = draw(model, chunk, lambda ks: cond[ks], w, cfg, device)
                for (i, j), xi in zip(chunk, x):
                    out[i, g, j] = xi
                bar.update(len(chunk))
    stem = os.path.splitext(cfg.out)[0]
    os.makedirs(stem, exist_ok=True)
    for i in range(len(cond)):
        sample_runs.save_sample(cond[i], os.path.join(stem, f"img{i}_cond.png"))
        for g, w in enumerate(cfg.guidance):
            for j in range(cfg.n):
                sample_runs.save_sample(out[i, g, j], os.path.join(stem, f"img{i}_w{w}_s{j}.png"))
    tmp = f"{stem}.tmp{os.getpid()}{os.path.splitext(cfg.out)[1]}"
    labeled_grid(cond.cpu(), out, cfg.guidance).save(tmp)
    os.replace(tmp, cfg.out)
    print(f"wrote {cfg.out}: {len(cond)} rows x {1 + len(cfg.guidance) * cfg.n} columns (condition, then "
          f"{cfg.n} per guidance {list(cfg.guidance)}); each sample in {stem}/")


def labeled_grid(cond, samples, guidance, gap=2):
    """cond (B, 3, S, S), samples (B, G, n, 3, S, S) -> a PIL grid under a header row "w=..." per block."""
    b, g, n, _, s, _ = samples.shape
    font = ImageFont.load_default()
    head = font.getbbox("w=0.5")[3] + 2 * gap
    canvas = Image.new("RGB", ((1 + g * n) * (s + gap) + gap, head + b * (s + gap) + gap), "white")
    pen = ImageDraw.Draw(canvas)
    for k, w in enumerate(guidance):
        pen.text((gap + (1 + k * n) * (s + gap), gap), f"w={w:g}", fill="black", font=font)
    to_pil = lambda x: Image.fromarray(((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
    for i in range(b):
        top = head + i * (s + gap)
        canvas.paste(to_pil(cond[i]), (gap, top))
        for k in range(g):
            for j in range(n):
                canvas.paste(to_pil(samples[i, k, j]), (gap + (1 + k * n + j) * (s + gap), top))
    return canvas


# ---------------------------------------------------------------------------------- K-shot (§7)
def page_name(pages, p):
    """A page's folder (or manifest) name; synthetic pages by number."""
    names = getattr(pages, "names", None)
    return str(names[p]) if names is not None else f"synthetic page {p}"


def kshot_plan(cfg):
    """-> (pages, items [(page, image)], plan [(item, num_samples)], §7 via metrics.kshot_select).
    Every problem is a one-line error naming the page and what to change, before any model loads."""
    try:
        pages, skipped = data.open_pages(cfg.data, None, decode=True,
                                         max_pixels=None if cfg.max_pixels < 0 else cfg.max_pixels)   # decode: no bad file hours later
    except (OSError, ValueError, KeyError) as e:
        fail(f"--data {cfg.data}: {e}")
    if skipped:
        print(f"{cfg.data}: skipped {len(skipped)} unreadable file(s), e.g. {next(iter(skipped))}", file=sys.stderr)
    counts = [pages.count(p) for p in range(len(pages))]
    if cfg.per_group and cfg.few_shot > cfg.per_group:
        fail(f"--few-shot {cfg.few_shot} picks K of the --per-group {cfg.per_group} test images of each page: "
             f"needs K <= {cfg.per_group}")
    need, flag = (cfg.per_group, "--per-group") if cfg.per_group else (cfg.few_shot, "--few-shot")
    small = [p for p, c in enumerate(counts) if c < need]
    if small:
        named = ", ".join(f"{page_name(pages, p)} ({counts[p]})" for p in small[:3])
        fail(f"{len(small)} page(s) of {cfg.data} have fewer than {need} test images ({flag} {need}): {named}"
             f"{' ...' if len(small) > 3 else ''}; lower {flag} to {min(counts)} or remove those pages")
    items = [(p, i) for p in range(len(pages)) for i in range(counts[p])]
    groups = [p for p, _ in items]                      # pages (or class folders) group the test images
    if cfg.per_group:
        keep = metrics.balanced_subset(groups, cfg.per_group, cfg.seed)
        items, groups = [items[j] for j in keep], [groups[j] for j in keep]
    if len(items) <= metrics.K_NN:
        fail(f"{len(items)} test images in {cfg.data}: precision/recall need at least {metrics.K_NN + 1} "
             f"(k = {metrics.K_NN} nearest neighbours, §7); add test images" + (" or raise --per-group" if cfg.per_group else ""))
    return pages, items, metrics.kshot_select(groups, cfg.few_shot, cfg.seed)


def embed(encoder, x):
    """Global embedding (B, D) float32 of images x in [-1, 1]: the §8.2 alignment space / default features."""
    return encoder(encoder.preprocess(x))[0].float()


@torch.no_grad()
def few_shot(cfg, model, device, plan, rank=0, world=1):
    """K-shot evaluation (§7, §8.2, App. H): FID / precision / recall / alignment per guidance value.
    Rank r of `world` draws the samples [r N / world, (r+1) N / world) of the plan; rank 0 gets all
    features and writes OUT/kshot.json, OUT/kshot.md and OUT/features_*.npy."""
    pages, items, plan = plan
    size = model.config.image_size
    sample_runs.check_resume(cfg, model, rank, world)
    load = lambda idx: torch.stack([pages.image(*items[j], size) for j in idx])
    act = lambda name: (cfg.encoder_act or None) if name.startswith("clip-") else None   # --encoder-act: CLIP files
    if cfg.features == "encoder":                      # DESIGN: the checkpoint's frozen encoder (global embedding)
        feat_name, features = f"{sample_runs.describe(model.encoder)} global embedding", lambda x: embed(model.encoder, x)
    else:
        try:
            net = metrics.feature_network(cfg.features, cfg.feature_weights or None, device, act=act(cfg.features))
        except (OSError, ValueError, KeyError) as e:
            fail(f"--features {cfg.features}: {e}")
        feat_name, features = net.name, net
    spaces = {}                                         # label -> encoder: the §8.2 alignment columns
    for name, weights in sample_runs.alignment_spaces(cfg.alignment):
        try:
            enc = model.encoder if name == "encoder" else encoders.load_encoder(name, weights, act=act(name)).to(device).eval()
        except (OSError, ValueError, KeyError) as e:
            fail(f"--alignment {name}={weights}: {e}")
        spaces[sample_runs.describe(enc) + (", the checkpoint's encoder" if name == "encoder" else "")] = enc
    conds, counts = [c for c, _ in plan], [n for _, n in plan]
    rows = [(k, s) for k, n in enumerate(counts) for s in range(n)]   # sample s of conditioning image k
    lo, hi = rank * len(rows) // world, (rank + 1) * len(rows) // world
    if rank == 0:
        real = []
        with sample_runs.progress(len(items), "test image features") as bar:
            for a in range(0, len(items), cfg.batch):
                real.append(features(load(range(a, min(a + cfg.batch, len(items)))).to(device)).cpu().numpy())
                bar.update(len(real[-1]))
        real = np.concatenate(real)
        np.save(os.path.join(cfg.out, "features_real.npy"), real)
        cond_emb = {k: torch.cat([embed(e, load(conds[a:a + cfg.batch]).to(device)).cpu()
                                  for a in range(0, len(conds), cfg.batch)]) for k, e in spaces.items()}
        print(f"{len(items)} test images in {len({p for p, _ in items})} groups, K = {cfg.few_shot} per group, "
              f"{len(plan)} conditioning images, {world} process(es); features: {feat_name}", flush=True)
    results = {}
    for w in cfg.guidance:
        folder = os.path.join(cfg.out, f"samples_w{w}")
        os.makedirs(folder, exist_ok=True)
        feats, embs = [], {k: [] for k in spaces}
        with sample_runs.progress(hi - lo, f"guidance {w}" + (f" rank {rank}" if world > 1 else "")) as bar:
            for a in range(lo, hi, cfg.batch):
                chunk = rows[a:min(a + cfg.batch, hi)]
                paths = [os.path.join(folder, f"cond{conds[k]:06d}_s{s}.png") for k, s in chunk]
                x = torch.empty(len(chunk), 3, size, size)
                todo = []
                for k, p in enumerate(paths):
                    if os.path.exists(p):
                        x[k] = sample_runs.read_sample(p)       # resumed: not redrawn
                    else:
                        todo.append(k)
                if todo:                                # noise of row (k, s): (seed, k, s), whatever the split
                    x[todo] = draw(model, [rows[a + k] for k in todo], lambda ks: load([conds[k] for k in ks]),
                                   w, cfg, device)
                    for k in todo:
                        sample_runs.save_sample(x[k], paths[k])
                feats.append(features(x.to(device)).cpu())
                for k, e in spaces.items():
                    embs[k].append(embed(e, x.to(device)).cpu())
                bar.update(len(chunk))
        mine = (torch.cat(feats) if feats else None, {k: torch.cat(v) if v else None for k, v in embs.items()})
        parts = [mine]
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, mine)           # in rank order = plan order
        if rank != 0:
            continue
        fake = torch.cat([f for f, _ in parts if f is not None]).numpy()
        np.save(os.path.join(cfg.out, f"features_w{w}.npy"), fake)
        res = metrics.kshot_metrics(real, fake)
        res["alignment"] = {k: metrics.alignment(cond_emb[k], torch.cat([e[k] for _, e in parts if e[k] is not None]),
                                                 counts) for k in spaces}          # §8.2: each sample vs its own
        results[str(w)] = res
        print(f"guidance {w}: " + ", ".join(f"{k} {v:.4g}" for k, v in res.items() if k in ("fid", "precision", "recall"))
              + "".join(f", alignment [{k}] {v:.4g}" for k, v in res["alignment"].items()), flush=True)
    if rank == 0:
        sample_runs.kshot_report(cfg, results, len(items), feat_name, list(spaces),
                                 sample_runs.networks_warning(cfg.features, spaces.values()))


# ------------------------------------------------------------------------------------------ main
def main(cfg):
    """One process, or torchrun (K-shot only: gloo on CPU, nccl on GPUs, rank r on cuda:LOCAL_RANK)."""
    plan = kshot_plan(cfg) if cfg.few_shot else None   # user errors in the data before the model loads
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not cfg.few_shot:
        fail("grids run in one process; torchrun is for --few-shot")
    if cfg.deterministic:
        sample_runs.deterministic()                     # before the first CUDA call
    d = backends.setup_distributed(cfg.device)
    try:
        model = load_model(cfg, d.device)
        if d.rank == 0:
            print(f"{cfg.ckpt}: step {getattr(model, 'checkpoint_step', '?')}, {model.config.image_size} px, "
                  f"{'EMA' if cfg.ema else 'raw'} weights, encoder {sample_runs.describe(model.encoder)}, "
                  f"{cfg.steps} DDPM steps, {d.world} process(es) on {d.device}", flush=True)
        if cfg.few_shot:
            few_shot(cfg, model, d.device, plan, d.rank, d.world)
        else:
            grid(cfg, model, d.device)
    except runs.UserError as e:             # samples of another run in --out (sample_runs.check_resume)
        fail(str(e))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    flags.survive_lost_output()  # `| head`, a killed `| tee`: sampling goes on
    main(parse_args())
