"""A yardstick: how fast does an independent class-conditional diffusion model learn to draw a kind?

Not part of the paper (DESIGN throughout). The default job's samples keep a page's palette and background
but not its object kind (docs/study.md). This trains a well-kept peer, the classifier-free-guidance Unet of
lucidrains/denoising-diffusion-pytorch (`classifier_free_guidance.py`; Ho & Salimans 2022), on the default
job's pages (`SyntheticPages(512, 32, seed=0)`), each image's class being the kind drawn in it
(`SyntheticPages.kind`), so the kind is given outright. It trains for a fixed wall budget (evaluation
excluded) and, at 4 000, 8 000, 16 000 ... training images and at the end, samples `--n` images per kind
and scores them with experiments/kinds.py's classifier: kind accuracy = P[predicted kind == class]
(chance 1/8). Printed table: images seen, training wall s, img/s, evaluation s, 1-min load, accuracy per
guidance scale.

The peer is never a dependency of the repository. Run it from a throwaway virtualenv; the package's
__init__ imports torchvision, so only its classifier_free_guidance.py file is loaded:

    python3 -m venv /tmp/peer && . /tmp/peer/bin/activate
    pip install torch==2.13.0 einops tqdm numpy pillow && pip install --no-deps denoising-diffusion-pytorch==2.3.4
    nice -n 10 python experiments/peer.py --seconds 600
"""
import argparse
import copy
import importlib.util
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kinds  # noqa: E402  (experiments/kinds.py: the kind classifier)
from pages import synthetic  # noqa: E402


def load_peer():
    """The package's classifier_free_guidance.py as a module, without running its __init__."""
    spec = importlib.util.find_spec("denoising_diffusion_pytorch")   # does not import the package
    if spec is None:
        sys.exit("peer.py: denoising-diffusion-pytorch is not installed (see the module docstring)")
    path = os.path.join(spec.submodule_search_locations[0], "classifier_free_guidance.py")
    module_spec = importlib.util.spec_from_file_location("peer_cfg", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    module.tqdm = lambda steps, **kwargs: steps       # no progress bars from its samplers
    return module


@torch.no_grad()
def kind_accuracy(diffusion, net, n, cond_scale, seed=0):
    """`n` samples of each kind at guidance `cond_scale` -> P[classifier's kind == the class]."""
    classes = torch.arange(len(synthetic.KINDS)).repeat_interleave(n)
    with torch.random.fork_rng():                    # the peer samples from torch's global generator
        torch.manual_seed(seed)
        images = diffusion.sample(classes, cond_scale=cond_scale) * 2 - 1    # [0, 1] -> [-1, 1]
    return (kinds.predict(net, images) == classes).float().mean().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description="Kind accuracy of a class-conditional peer against images seen.")
    ap.add_argument("--seconds", type=float, default=600, help="training wall budget, evaluation excluded (600)")
    ap.add_argument("--images", type=int, default=0, help="stop at this many images instead, if sooner (0: none)")
    ap.add_argument("--batch", type=int, default=32, help="batch (32, the default job's)")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (1e-3, the default job's)")
    ap.add_argument("--dim", type=int, default=32, help="Unet base width (32: 2.9 M parameters)")
    ap.add_argument("--p-uncond", type=float, default=0.1, help="class dropout for guidance (0.1, the job's)")
    ap.add_argument("--ema", type=float, default=0.99, help="EMA decay of the sampled weights (0.99, the job's)")
    ap.add_argument("--n", type=int, default=8, help="samples per kind at each evaluation (8: 64 samples)")
    ap.add_argument("--sampling-steps", type=int, default=16, help="DDIM steps at evaluation (16)")
    ap.add_argument("--cond-scales", default="1.5,6", help="guidance scales evaluated: 1.5 = the job's w 0.5; "
                                                           "6 = the package's default")
    ap.add_argument("--first", type=int, default=4000, help="first evaluation at this many images; then x2")
    ap.add_argument("--cache", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                    "runs", "kinds"), help="kind classifier cache (runs/kinds)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="", help="also write the rows here (experiments/job_curve.py --peer draws them)")
    a = ap.parse_args(argv)
    try:
        scales = [float(s) for s in a.cond_scales.split(",")]
    except ValueError:
        ap.error(f"--cond-scales must be comma-separated numbers, got {a.cond_scales!r}")
    if 1.0 in scales:
        ap.error("--cond-scales: the package's sampler needs a scale other than 1")
    for flag in ("seconds", "batch", "lr", "dim", "n", "sampling_steps", "first"):
        if getattr(a, flag) <= 0:
            ap.error(f"--{flag.replace('_', '-')} must be > 0, got {getattr(a, flag)}")
    if a.images < 0:
        ap.error(f"--images must be >= 0, got {a.images}")
    if not (0 <= a.p_uncond < 1 and 0 <= a.ema < 1):
        ap.error("--p-uncond and --ema must be in [0, 1)")

    peer = load_peer()
    net, rep = kinds.train_classifier(a.cache)
    print(f"kind classifier: held-out accuracy {rep['held_out_accuracy']:.3f}")
    x, y = kinds.kind_bank(512, 0)            # every image of the default job's pages and its drawn kind
    x = (x + 1) / 2                           # the peer takes [0, 1] images
    torch.manual_seed(a.seed)
    unet = peer.Unet(dim=a.dim, num_classes=len(synthetic.KINDS), cond_drop_prob=a.p_uncond,
                     dim_mults=(1, 2, 4))      # levels at 32, 16, 8 px (the package's default adds 4 px)
    diffusion = peer.GaussianDiffusion(unet, image_size=32, timesteps=1000, sampling_timesteps=a.sampling_steps,
                                       objective="pred_v")
    ema = copy.deepcopy(diffusion).eval()
    opt = torch.optim.Adam(diffusion.parameters(), lr=a.lr, betas=(0.9, 0.99))
    print(f"peer Unet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters; "
          f"{len(x)} training images from 512 pages; threads {torch.get_num_threads()}")

    gen = torch.Generator().manual_seed(a.seed)
    rows, records, seen, train_s, next_eval = [], [], 0, 0.0, a.first
    header = "| images seen | train wall s | img/s | eval s | load 1 min | " + \
             " | ".join(f"kind accuracy, cond_scale {s:g}" for s in scales) + " |"
    print(header)
    while True:
        t0 = time.time()
        idx = torch.randint(len(x), (a.batch,), generator=gen)
        loss = diffusion(x[idx], classes=y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), diffusion.parameters()):
                e.lerp_(p, 1 - a.ema)
        train_s += time.time() - t0
        seen += a.batch
        done = train_s >= a.seconds or 0 < a.images <= seen
        if seen >= next_eval or done:
            t1 = time.time()
            accs = [kind_accuracy(ema, net, a.n, s, a.seed) for s in scales]
            row = f"| {seen} | {train_s:.0f} | {seen / train_s:.1f} | {time.time() - t1:.0f} | " \
                  f"{os.getloadavg()[0]:.2f} | " + " | ".join(f"{acc:.3f}" for acc in accs) + " |"
            rows.append(row)
            records.append(dict(images=seen, train_s=round(train_s, 1), accuracy=accs[0],
                                accuracies=dict(zip(map(str, scales), accs))))
            print(row, f"(loss {loss.item():.4f})", flush=True)
            next_eval = next_eval * 2 if seen >= next_eval else next_eval
        if done:
            break
    print("\n" + header + "\n" + "| --- " * (5 + len(scales)) + "|\n" + "\n".join(rows))
    if a.json:
        with open(a.json + ".tmp", "w") as f:
            json.dump(dict(command=" ".join(sys.argv), cond_scales=scales, rows=records), f, indent=1)
        os.replace(a.json + ".tmp", a.json)


if __name__ == "__main__":
    main()
