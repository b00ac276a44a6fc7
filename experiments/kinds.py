"""Does a sample have its condition's semantics? An object-kind classifier applied to samples.

Semantica's claim is that variations keep the conditioning image's semantics (§1, §8: "semantically
faithful"); the paper measures it with a user study and CLIP/DINOv2 alignment (§8.2, App. F). On the
synthetic pages the semantics has a ground truth, the object kind (synthetic.KINDS, 8 kinds, chance
1/8), so a reader can trust a plainer measure: a small CNN trained on held-out real synthetic images to
name the kind (its held-out accuracy is reported, goal >= 90 %), then applied to samples:
  - kind agreement: the share of samples whose predicted kind equals the prediction on their condition;
  - accuracy on samples relative to real images: accuracy of the classifier on samples (against the
    condition's true kind) divided by its accuracy on real test images.

    python experiments/kinds.py runs/tiny/ckpt.pt     # sample the default job on held-out pages, report

Not part of the paper (DESIGN throughout); experiments/claims.py reports it for every claims setting.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import semantica  # noqa: E402
from pages import synthetic  # noqa: E402
import outputs  # noqa: E402  (experiments/outputs.py: output paths refused in one line)

CLASSIFIER_PAGES_SEED = 404   # DESIGN: held-out pages of their own seed (training pages: 0, claims test: 303)
CHECK_PAGES_SEED = 405        # held-out pages that measure the classifier's own accuracy
TEST_PAGES_SEED = 303         # the claims' test pages (experiments/claims.py TEST_PAGES_SEED)
GOAL_ACCURACY = 0.9           # DESIGN: the classifier is trusted at >= 90 % held-out accuracy


class KindCNN(nn.Module):
    """(B, 3, S, S) in [-1, 1] -> (B, len(KINDS)) logits. Three conv stages (16, 32, 64 channels) with
    GroupNorm and SiLU, global average pooling and a linear head (DESIGN: small, CPU-trainable)."""

    def __init__(self, classes=len(synthetic.KINDS), width=16):
        super().__init__()
        layers, c_in = [], 3
        for c in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU(), nn.MaxPool2d(2)]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, classes)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))


def kind_bank(num_pages, seed, size=32):
    """Every image of `num_pages` web-like synthetic pages -> (images (N,3,S,S) in [-1,1], kind (N,)),
    the kind being what is drawn (SyntheticPages.kind: outliers carry their own kind)."""
    pages = synthetic.SyntheticPages(num_pages, size, seed=seed)
    items = [(p, i) for p in range(len(pages)) for i in range(pages.count(p))]
    return (torch.stack([pages.image(p, i) for p, i in items]),
            torch.tensor([pages.kind(p, i) for p, i in items]))


@torch.no_grad()
def predict(net, images, batch=512):
    """(N,3,S,S) in [-1,1] -> predicted kind (N,) long."""
    net.eval()
    return torch.cat([net(images[i:i + batch].float()).argmax(1) for i in range(0, len(images), batch)])


def train_classifier(cache_dir, size=32, pages=3000, steps=800, batch=64, lr=2e-3, width=16, seed=0,
                     log=print):
    """Train (or load from cache_dir) the kind classifier -> (net, report dict with held-out accuracy).

    Trained with Adam + cosine decay on `pages` held-out pages (seed CLASSIFIER_PAGES_SEED), random
    flips as augmentation (kinds are flip-invariant up to rotation); accuracy measured on pages / 3
    other pages (seed CHECK_PAGES_SEED). Cached by its settings."""
    style = synthetic.SyntheticPages(1, size).style()              # the pages it learns: their drawing style
    tag = hashlib.sha1(json.dumps([size, pages, steps, batch, lr, width, seed, style, "v3"]).encode()
                       ).hexdigest()[:10]   # v2: init seeded; v3: the whole style (framed pages)
    path = os.path.join(cache_dir, f"kind_cnn_{tag}.pt")
    if os.path.exists(path):
        net = KindCNN(width=width)
        state = torch.load(path, map_location="cpu")
        net.load_state_dict(state["net"])
        return net.eval(), state["report"]
    t0 = time.time()
    torch.manual_seed(seed)                     # before the init: the network is a function of its tag alone
    net = KindCNN(width=width)
    x, y = kind_bank(pages, CLASSIFIER_PAGES_SEED, size)
    opt = torch.optim.Adam(net.parameters(), lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for step in range(steps):
        idx = torch.randint(len(x), (batch,), generator=gen)
        xb = x[idx]
        flip = torch.rand(batch, generator=gen) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        loss = F.cross_entropy(net(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 250 == 0:
            log(f"kind classifier: step {step + 1}/{steps}, loss {loss.item():.3f}, {time.time() - t0:.0f} s")
    xc, yc = kind_bank(max(pages // 3, 10), CHECK_PAGES_SEED, size)
    acc = (predict(net, xc) == yc).float().mean().item()
    report = dict(train_images=len(x), steps=steps, batch=batch, held_out_images=len(xc),
                  held_out_accuracy=acc, seconds=round(time.time() - t0, 1))
    os.makedirs(cache_dir, exist_ok=True)
    torch.save(dict(net=net.state_dict(), report=report), path + ".tmp")
    os.replace(path + ".tmp", path)
    return net.eval(), report


def kind_scores(net, cond, cond_kind, samples, sample_cond, real=None, real_kind=None):
    """Kind measures of samples against their conditions.

    cond: (M,3,S,S) conditioning images in [-1,1], cond_kind: (M,) their true kinds; samples: (N,3,S,S),
    sample_cond: (N,) index into cond of each sample's condition; real/real_kind: real test images and
    their kinds for the reference accuracy.
    -> dict(agreement = P[pred(sample) == pred(its condition)] (chance 1/8),
            sample_accuracy = P[pred(sample) == true kind of its condition],
            real_accuracy, relative_accuracy = sample_accuracy / real_accuracy)."""
    p_cond, p_samp = predict(net, cond), predict(net, samples)
    out = dict(agreement=(p_samp == p_cond[sample_cond]).float().mean().item(),
               sample_accuracy=(p_samp == cond_kind[sample_cond]).float().mean().item())
    if real is not None:
        out["real_accuracy"] = (predict(net, real) == real_kind).float().mean().item()
        out["relative_accuracy"] = out["sample_accuracy"] / max(out["real_accuracy"], 1e-9)
    return out


def test_conditions(num_pages, size=32, seed=TEST_PAGES_SEED):
    """One conditioning image per held-out clean test page -> (images (M,3,S,S), true kinds (M,))."""
    pages = synthetic.SyntheticPages(num_pages, size, seed=seed, p_outlier=0.0, p_duplicate=0.0)
    return (torch.stack([pages.image(p, 0) for p in range(num_pages)]),
            torch.tensor([pages.label(p) for p in range(num_pages)]))


def evaluate_checkpoint(ckpt, net, pages=64, n=4, guidance=0.5, steps=64, seed=0, model=None):
    """Sample `n` variations of one condition per held-out test page (seed TEST_PAGES_SEED) from a
    train.py checkpoint (or `model`, its Semantica when already loaded) and score them with kind_scores
    -> (scores dict, cond (M,3,S,S), samples (M,n,3,S,S))."""
    model = model or semantica.Semantica.from_checkpoint(ckpt)
    size = model.net.config.image_size
    cond, kind = test_conditions(pages, size)
    t0 = time.time()
    samples = model.sample(cond=cond, num_samples=n, guidance=guidance, steps=steps, seed=seed)
    seconds = time.time() - t0
    real, real_kind = kind_bank(200, CHECK_PAGES_SEED + 1, size)
    index = torch.arange(len(cond)).repeat_interleave(n)
    scores = kind_scores(net, cond, kind, samples.flatten(0, 1), index, real, real_kind)
    return dict(pages=pages, n=n, guidance=guidance, steps=steps, sample_seconds=round(seconds, 1),
                chance=1 / len(synthetic.KINDS), **scores), cond, samples


def main(argv=None):
    ap = argparse.ArgumentParser(description="Kind agreement of a checkpoint's variations on held-out pages.")
    ap.add_argument("ckpt", help="a train.py checkpoint (OUT/ckpt.pt) of a 32 px synthetic-pages model")
    ap.add_argument("--pages", type=int, default=64, help="held-out test pages (one condition each; default 64)")
    ap.add_argument("--n", type=int, default=4, help="samples per condition (default 4)")
    ap.add_argument("--guidance", type=float, default=0.5, help="guidance weight (default 0.5, §6.1's ablations)")
    ap.add_argument("--steps", type=int, default=64, help="DDPM steps (default 64)")
    ap.add_argument("--cache", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runs",
                                                    "kinds"), help="classifier cache folder (default: runs/kinds)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    a = ap.parse_args(argv)
    if not os.path.isfile(a.ckpt):
        ap.error(f"no checkpoint at {a.ckpt}")
    for flag in ("pages", "n", "steps"):
        if getattr(a, flag) < 1:
            ap.error(f"--{flag} must be >= 1, got {getattr(a, flag)}")
    if not math.isfinite(a.guidance):
        ap.error(f"--guidance must be a finite number, got {a.guidance}")
    if not 0 <= a.seed <= semantica.MAX_SEED:
        ap.error(f"--seed must be an integer in [0, 2^63 - 1], got {a.seed}")
    bad = outputs.output_error("--cache", a.cache, folder=True)
    if bad:
        ap.error(bad)
    try:
        data = (semantica.read_checkpoint(a.ckpt).get("train_config") or {}).get("data", "synthetic")
        if data == "synthetic":
            model = semantica.Semantica.from_checkpoint(a.ckpt)
    except Exception as e:                                  # noqa: BLE001 (any unreadable file: one line)
        ap.error(f"{a.ckpt}: not a train.py checkpoint ({str(e).splitlines()[0][:200]})")
    if data != "synthetic":      # the classifier knows the synthetic kinds only: any other data scores nonsense
        ap.error(f"the checkpoint was trained on --data {data}, not synthetic pages; kind agreement needs a "
                 "synthetic-pages model")
    if model.net.config.image_size != 32:
        ap.error(f"{a.ckpt}: a {model.net.config.image_size} px model; the kind classifier reads 32 px synthetic pages")
    net, rep = train_classifier(a.cache)
    print(f"classifier: held-out accuracy {rep['held_out_accuracy']:.3f} ({rep})")
    scores, _, _ = evaluate_checkpoint(a.ckpt, net, a.pages, a.n, a.guidance, a.steps, a.seed, model=model)
    print(json.dumps(dict(ckpt=a.ckpt, **scores)))


if __name__ == "__main__":
    from machinery import flags
    flags.survive_lost_output()  # `| head`, a killed `| tee`: the command goes on
    main()
