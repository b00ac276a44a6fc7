"""A sampling run's bookkeeping: sample.py's flag and --out checks, its samples on disk, its report.

Machinery, not the paper (§7 and §8.2 define the K-shot metrics and alignment; sample.py computes them). Flags:
the combinations nothing can be done with and an --out that cannot be written, refused before any model loads.
Samples on disk: 8-bit PNGs written atomically, read back instead of redrawn by a resumed K-shot evaluation
when OUT/run.json records the same run and the same weights (their sha256), else a one-line `runs.UserError`;
features are taken from the 8-bit values in both cases (`quantize`), so a resumed run gives the same numbers.
--deterministic (GPU kernels that do not change between reruns), the progress bars, and the report
(OUT/kshot.json, OUT/kshot.md), which says in one line when its networks are not the paper's (Inception-v3
for FID, §7; CLIP B/16 and DINOv2 B for alignment, §8.2). The training run's bookkeeping is machinery/runs.py.
"""
import hashlib
import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from machinery.runs import UserError
from pages import images


# ----------------------------------------------------------------------------- flags and --out (before any model loads)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")  # a grid's --out


def check_config(cfg):
    """sample.py: the first flag (or combination) nothing can be done with, as a message (None when all are
    usable); numbers were checked by their flag types."""
    if not cfg.ckpt:
        return "--ckpt is required"
    if not cfg.guidance:
        return "--guidance needs at least one value"
    if not cfg.few_shot and not cfg.images:
        return "give --images A.png ... (grid) or --few-shot K --data DIR (evaluation)"
    if cfg.few_shot and not cfg.data:
        return "--few-shot needs --data (the test images)"
    if cfg.features != "encoder" and not cfg.feature_weights:
        return f"--features {cfg.features} needs --feature-weights (random features give meaningless metrics)"
    try:
        alignment_spaces(cfg.alignment)
    except ValueError as e:
        return str(e)
    return check_out(cfg.out, folder=bool(cfg.few_shot))


def check_out(out, folder):
    """The output path must be writable in the form the mode needs; -> an error message or None."""
    if folder and os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out} is a file; --few-shot writes a folder"
    if not folder:
        if os.path.isdir(out):
            return f"--out {out} is a folder; give the grid's file name, e.g. {os.path.join(out, 'grid.png')}"
        if os.path.splitext(out)[1].lower() not in IMAGE_EXTS:
            return f"--out {out}: unknown image extension; use one of {', '.join(IMAGE_EXTS)}"
        stem = os.path.splitext(out)[0]
        if os.path.exists(stem) and not os.path.isdir(stem):
            return f"--out {out}: its samples go to the folder {stem}, which is a file"
    # before sampling: the folder the samples go to (the grid's stem) must be one that can be made (not under
    # /proc, a file or a read-only folder); it is made when the first sample is written
    why = images.folder_error(out if folder else os.path.splitext(out)[0])
    return f"--out {out}: {why}" if why else None


def alignment_spaces(spec):
    """"encoder,dinov2-b14=PATH" -> [("encoder", None), ("dinov2-b14", "PATH")]."""
    spaces = []
    for item in filter(None, spec.split(",")):
        name, _, weights = item.partition("=")
        if name != "encoder" and not weights:
            raise ValueError(f"--alignment {name} needs its weights: {name}=PATH (or 'encoder', the checkpoint's own)")
        spaces.append((name, weights or None))
    return spaces


# ----------------------------------------------------------------------------- samples on disk, exact resume

def quantize(x):
    """[-1, 1] -> the values an 8-bit PNG of x reads back as (images.save_png's rounding)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def save_sample(image, path):
    """A sample (3, H, W) in [-1, 1] as a PNG, written atomically: a killed run never leaves a truncated sample
    that a resume would trust."""
    tmp = f"{path}.tmp{os.getpid()}.png"
    images.save_png(image.cpu(), tmp)
    os.replace(tmp, path)


def read_sample(path):
    """A sample written by save_sample() -> (3, H, W) in [-1, 1], exactly quantize() of what was drawn."""
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), np.float32)).permute(2, 0, 1) / 127.5 - 1


def weights_fingerprint(model):
    """sha256 (hex) of the weights that draw the samples: the model's state dict and its frozen encoder's, each
    tensor's name, dtype, shape and bytes. A model retrained to the same path and step has another one."""
    h = hashlib.sha256()
    for part in (model, model.encoder):
        for name, t in part.state_dict().items():
            t = t.detach().cpu().contiguous().reshape(-1)
            h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy())       # the raw bytes, whatever the dtype (bf16 too)
    return h.hexdigest()


def check_resume(cfg, model, rank, world):
    """sample.py --few-shot: samples on disk are reused only if they were drawn by the same run, weights
    included (else a UserError: a new --out); rank 0 then records the run in OUT/run.json."""
    run = {"ckpt": os.path.abspath(cfg.ckpt), "step": getattr(model, "checkpoint_step", None), "ema": cfg.ema,
           "weights_sha256": weights_fingerprint(model), "steps": cfg.steps, "gamma": cfg.gamma, "seed": cfg.seed,
           "data": cfg.data, "per_group": cfg.per_group, "few_shot": cfg.few_shot,
           "image_size": model.config.image_size}
    path = os.path.join(cfg.out, "run.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        differ = [k for k in run if old.get(k) != run[k]]
        if differ:
            retrained = ": another model at the same path and step" if differ == ["weights_sha256"] else ""
            raise UserError(f"--out {cfg.out} holds samples of another run (differs in {', '.join(differ)}"
                            f"{retrained}); use a new --out")
    if world > 1:
        dist.barrier()                                   # every rank has read run.json before it is written
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        write_text(path, json.dumps(run, indent=1))


# ----------------------------------------------------------------------------- GPU determinism, progress

def deterministic():
    """sample.py --deterministic: GPU results that do not change between reruns, at some speed. By default cuDNN
    convolutions run in TF32 (10-bit mantissa) and kernels are picked per shape and run, some with atomic
    (unordered) sums; on CPUs results are deterministic already. Turns TF32 off (matmuls and convolutions),
    cuDNN autotuning off, and makes torch use deterministic algorithms only (an op without one raises);
    cuBLAS needs CUBLAS_WORKSPACE_CONFIG set before its first call."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # PyTorch docs, "Reproducibility"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True)


def progress(total, what):
    """sample.py's progress bar: tqdm with a smoothed ETA on a terminal; on a log file a line every 30 s."""
    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=what, unit="img", file=sys.stderr, mininterval=0.5 if tty else 30,
                disable=None if tty else False, dynamic_ncols=True)


# ----------------------------------------------------------------------------- report

def describe(encoder):
    """A network's name and where its weights came from, for tables."""
    src = os.path.basename(encoder.weights.rstrip("/")) if encoder.weights else \
        f"random init, seed {getattr(encoder, 'seed', None)}"
    return f"{encoder.name} ({src})"


PAPER_FEATURES = "inception"                 # §7: FID (Heusel et al. 2017), defined on Inception-v3 pool3 features
PAPER_ALIGNMENT = ("clip-b16", "dinov2-b14")  # §8.2, App. F: alignment in CLIP B/16 and DINOv2 B space


def networks_warning(features, alignment):
    """One line naming the networks of a K-shot report that are not the paper's, None when all are.
    features: --features ("encoder", "inception" or a preset); alignment: the alignment encoders (.name,
    .weights: None for a random init, which is never the paper's)."""
    wrong = []
    if features != PAPER_FEATURES:
        source = "the checkpoint's encoder" if features == "encoder" else features
        wrong.append(f"FID / precision / recall on {source} features, not Inception-v3 (§7: --features inception)")
    names = sorted(e.name if e.weights else f"{e.name} (random init)" for e in alignment)
    if names != sorted(PAPER_ALIGNMENT):
        wrong.append(f"alignment in {', '.join(names)}, not CLIP B/16 and DINOv2 B (§8.2, App. F: "
                     f"--alignment clip-b16=PATH,dinov2-b14=PATH)")
    return "NOT THE PAPER'S NETWORKS, numbers not comparable with its: " + "; ".join(wrong) if wrong else None


def kshot_report(cfg, results, n, feat_name, spaces, warning):
    """sample.py --few-shot's results: OUT/kshot.json and the App. H-style OUT/kshot.md table, also printed;
    all name every network, and carry `warning` (networks_warning) as one line when it is not None."""
    summary = {"ckpt": cfg.ckpt, "data": cfg.data, "features": feat_name, "alignment_spaces": spaces,
               "not_the_papers_networks": warning, "n": n, "k": cfg.few_shot, "steps": cfg.steps,
               "gamma": cfg.gamma, "seed": cfg.seed, "results": results}
    write_text(os.path.join(cfg.out, "kshot.json"), json.dumps(summary, indent=1))
    table = [f"{cfg.few_shot}-shot on {cfg.data}: N = {n} test images and N samples, {cfg.steps} DDPM steps, "
             f"gamma {cfg.gamma}, seed {cfg.seed}", *([warning] if warning else []),
             f"FID / precision / recall features: {feat_name}"]
    table += [f"alignment {i + 1}: mean cosine of each sample with its conditioning image in {s} (§8.2)"
              for i, s in enumerate(spaces)]
    table += ["", "| guidance | FID | precision | recall |" + "".join(f" alignment {i + 1} |" for i in range(len(spaces))),
              "| --- | --- | --- | --- |" + " --- |" * len(spaces)]
    table += [f"| {w} | {r['fid']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} |"
              + "".join(f" {a:.3f} |" for a in r["alignment"].values()) for w, r in results.items()]
    write_text(os.path.join(cfg.out, "kshot.md"), "\n".join(table) + "\n")
    print("\n".join(table))


def write_text(path, text):
    """Atomic text write (tmp + os.replace)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
