"""Sample image variations from a train.py checkpoint, and run the K-shot evaluation of §7/§8.

Semantica (arXiv 2405.14857): Fig. 1 (each conditioning image followed by its variations), Fig. 14
(one column per guidance factor, 0.0-1.0), §7 (K-shot FID / precision / recall: N test images, K
conditioning images picked at random, N/K samples each), §8.2 and App. H (FID per guidance).

    python sample.py --ckpt runs/tiny/ckpt.pt --images A.png B.jpg --n 8 --guidance 0.5 --out grid.png
    python sample.py --ckpt CKPT --images A.png --n 1 --guidance 0,0.1,0.2,0.5,1.0 --out fig14.png
    python sample.py --ckpt CKPT --few-shot 1 --data DIR --guidance 0,0.5,1 --out eval/

The model is rebuilt from the checkpoint's config and uses the EMA weights (`--no-ema` for the raw
ones). Sampling: DDPM with gamma 0.2 and guidance (1 + w) v_cond - w v_uncond (diffusion.py).
Grid layout: one row per conditioning image: the image, then for each guidance value --n samples
(the same noise for every guidance value, so the columns differ only in w).
Not implemented: multi-GPU sampling for the 50k-sample FID of §6.1.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

import diffusion
import train


@dataclass
class SampleConfig:
    ckpt: str = ""                     # train.py checkpoint (OUT/ckpt.pt)
    images: tuple = ()                 # conditioning image files (grid mode)
    n: int = 8                         # variations per conditioning image and guidance value (Fig. 1: 8)
    guidance: tuple = (diffusion.GUIDANCE,)  # §6.1: 0.5; a list gives the Fig. 14 layout
    steps: int = 256                   # DESIGN: DDPM steps (the paper does not state them)
    gamma: float = diffusion.GAMMA     # §6.1: "DDPM sampler with an interpolation of 0.2"
    seed: int = 0
    out: str = "grid.png"              # grid PNG, or the output folder with --few-shot
    few_shot: int = 0                  # K > 0: K-shot evaluation on --data (§7)
    data: str = ""                     # test images: folder, manifest or "synthetic"
    per_group: int = 0                 # test images per page / class (§8.2: 10 per ImageNet class); 0 = all
    features: str = "encoder"          # "encoder" (the checkpoint's), "inception" or an encoders.py name
    feature_weights: str = ""          # weights of --features (inception: pt_inception-2015-12-05-6726825d.pth)
    encoder_weights: str = ""          # override the encoder file named in the checkpoint
    ema: bool = True                   # sample from the EMA weights (style.md C13)
    batch: int = 64                    # conditioning images per sampling call


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    train.add_flags(parser, SampleConfig, asdict(SampleConfig()))
    args = vars(parser.parse_args(argv))
    try:  # "--guidance 0,0.5 1" -> (0.0, 0.5, 1.0)
        args["guidance"] = tuple(float(v) for s in args["guidance"] for v in str(s).split(",") if v)
    except ValueError as e:
        parser.error(f"--guidance takes numbers such as 0,0.1,0.5: {e}")
    cfg = SampleConfig(**{**args, "images": tuple(args["images"])})
    if not cfg.ckpt:
        parser.error("--ckpt is required")
    if not cfg.few_shot and not cfg.images:
        parser.error("give --images A.png ... (grid) or --few-shot K --data DIR (evaluation)")
    if cfg.few_shot and not cfg.data:
        parser.error("--few-shot needs --data (the test images)")
    return cfg


def load_model(cfg, device):
    """Rebuild Semantica from a train.py checkpoint's config; load EMA (or raw) weights."""
    ckpt = train.load_checkpoint(cfg.ckpt)
    tcfg = train.TrainConfig(**{k: v for k, v in ckpt["cfg"].items() if k in train.TrainConfig.__dataclass_fields__})
    if cfg.encoder_weights:
        tcfg.encoder_weights = cfg.encoder_weights
    elif tcfg.encoder_weights and not os.path.exists(tcfg.encoder_weights):
        raise SystemExit(f"{cfg.ckpt} was trained with encoder weights {tcfg.encoder_weights}, which do not "
                         f"exist here; pass --encoder-weights PATH")
    encoder = train.build_encoder(tcfg, ckpt.get("encoder_state"))
    model = train.build_model(tcfg, encoder)
    try:
        model.load_state_dict(ckpt["ema" if cfg.ema else "model"])
    except RuntimeError as e:
        raise SystemExit(f"{cfg.ckpt}: weights do not fit the model its config describes: {e}") from e
    return model.to(device).eval(), encoder.to(device), tcfg, ckpt["step"]


@torch.no_grad()
def variations(model, cond, cfg, seed, autocast):
    """-> (B, len(guidance) * n, 3, H, W): for each guidance value n samples, the same noise for each w."""
    cols = []
    for w in cfg.guidance:
        g = torch.Generator(cond.device).manual_seed(seed)
        with autocast:
            cols.append(model.sample(cond, cfg.n, steps=cfg.steps, guidance=w, gamma=cfg.gamma,
                                     generator=g).float())  # (B, n, 3, H, W)
    return torch.cat(cols, 1)


def grid(cfg, model, size, device, autocast):
    import data
    cond = []
    for path in cfg.images:
        try:
            cond.append(data.load_image(path, size))
        except Exception as e:
            raise SystemExit(f"cannot read conditioning image {path}: {type(e).__name__}: {e}") from e
    cond = torch.stack(cond).to(device)  # (B, 3, S, S)
    samples = torch.cat([variations(model, cond[i:i + cfg.batch], cfg, cfg.seed + i, autocast)
                         for i in range(0, len(cond), cfg.batch)])
    train.save_grid(torch.cat([cond[:, None], samples], 1), cfg.out)  # Fig. 1 / Fig. 14 layout
    print(f"wrote {cfg.out}: {len(cond)} rows x {1 + samples.shape[1]} columns "
          f"(condition, then {cfg.n} per guidance {list(cfg.guidance)})")


def few_shot(cfg, model, encoder, tcfg, size, device, autocast):
    """K-shot evaluation (§7, §8.2, App. H): FID / precision / recall / alignment per guidance value."""
    import data
    import metrics
    pages, skipped = data.open_pages(cfg.data, size)
    items = [(p, i) for p in range(len(pages)) for i in range(pages.count(p))]
    groups = [p for p, _ in items]  # pages (or class folders) group the test images
    if cfg.per_group:
        keep = metrics.balanced_subset(groups, cfg.per_group, cfg.seed)
        items, groups = [items[j] for j in keep], [groups[j] for j in keep]
    plan = metrics.kshot_select(groups, cfg.few_shot, cfg.seed)  # [(cond index, samples)], N in all
    by_count = {}
    for c, n in plan:
        by_count.setdefault(n, []).append(c)
    if cfg.features == "encoder":  # DESIGN: default = the checkpoint's own frozen encoder (global embedding)
        src = os.path.basename(tcfg.encoder_weights) if tcfg.encoder_weights else "RANDOM weights"
        net = metrics.FeatureNetwork(f"{encoder.name} global embedding ({src})", encoder, encoder.preprocess)
    else:
        net = metrics.feature_network(cfg.features, cfg.feature_weights or None, device)
    def load(idx):  # test images at the model's resolution, loaded on demand (N can be 10k+)
        return torch.stack([pages.image(*items[j]) for j in idx])

    real = metrics.extract_features(net, (load(range(i, min(i + cfg.batch, len(items))))
                                          for i in range(0, len(items), cfg.batch)), device=device, progress=False)
    os.makedirs(cfg.out, exist_ok=True)
    np.save(os.path.join(cfg.out, "features_real.npy"), real)
    print(f"{len(items)} test images in {len(set(groups))} groups, K = {cfg.few_shot} per group, "
          f"{len(plan)} conditioning images; features: {net.name}", flush=True)
    results = {}
    for w in cfg.guidance:
        folder, start, done, feats = os.path.join(cfg.out, f"samples_w{w}"), time.time(), 0, []
        os.makedirs(folder, exist_ok=True)
        for n, conds in by_count.items():  # model.sample draws the same number of samples per image
            per_call = max(1, cfg.batch // n)
            for b in range(0, len(conds), per_call):
                idx = conds[b:b + per_call]
                g = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + n * 10_007 + b)  # same noise for all w
                with autocast:
                    x = model.sample(load(idx).to(device), n, steps=cfg.steps, guidance=w, gamma=cfg.gamma,
                                     generator=g).float()  # (len(idx), n, 3, S, S)
                f = net(x.flatten(0, 1)).cpu().view(len(idx), n, -1)
                for j, c in enumerate(idx):
                    feats.append((c, f[j]))
                    for s in range(n):
                        data.save_png(x[j, s].cpu(), os.path.join(folder, f"cond{c:06d}_{s:03d}.png"))
                done += len(idx) * n
                rate = done / (time.time() - start)
                print(f"guidance {w}: {done}/{len(items)} samples, {rate:.2f}/s, ETA "
                      f"{(len(items) - done) / rate:.0f} s", file=sys.stderr, flush=True)
        feats.sort(key=lambda cf: cf[0])  # ordered by conditioning image, as alignment expects
        fake = torch.cat([f for _, f in feats]).numpy()
        np.save(os.path.join(cfg.out, f"features_w{w}.npy"), fake)
        res = metrics.kshot_metrics(real, fake)
        res["alignment"] = metrics.alignment(real[[c for c, _ in feats]], fake, [len(f) for _, f in feats])  # §8.2
        results[str(w)] = res
        print(f"guidance {w}: " + ", ".join(f"{k} {v:.4g}" for k, v in res.items()), flush=True)
    summary = {"ckpt": cfg.ckpt, "data": cfg.data, "features": net.name, "n": len(items), "k": cfg.few_shot,
               "steps": cfg.steps, "seed": cfg.seed, "results": results}
    with open(os.path.join(cfg.out, "kshot.json"), "w") as f:
        json.dump(summary, f, indent=1)
    table = [f"{cfg.few_shot}-shot on {cfg.data}: N = {len(items)} test images and N samples, "
             f"features: {net.name}, {cfg.steps} DDPM steps (App. H layout)", "",
             "| guidance | FID | precision | recall | alignment |", "| --- | --- | --- | --- | --- |"]
    table += [f"| {w} | {r['fid']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['alignment']:.3f} |"
              for w, r in results.items()]
    with open(os.path.join(cfg.out, "kshot.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    print("\n".join(table))
    return summary


def main(cfg):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, encoder, tcfg, step = load_model(cfg, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and tcfg.bf16)
    size = model.net.config.image_size
    print(f"{cfg.ckpt}: step {step}, {tcfg.model} + {tcfg.encoder}, {size} px, "
          f"{'EMA' if cfg.ema else 'raw'} weights, {cfg.steps} DDPM steps")
    if cfg.few_shot:
        few_shot(cfg, model, encoder, tcfg, size, device, autocast)
    else:
        grid(cfg, model, size, device, autocast)


if __name__ == "__main__":
    main(parse_args())
