"""The metric feature network of the claims experiments, trained here on held-out synthetic pages.

Semantica (arXiv 2405.14857) measures its samples in the space of a network trained elsewhere, on other
data: Inception-v3 trained on ImageNet labels (FID, precision/recall, §7, §8.2). No weights can be
downloaded here, and a random-weight network gives metrics without meaning. So a small CNN (another
architecture than the encoder's, other pages) is trained from scratch on synthetic pages that the diffusion
models never see (their own seed), *supervised* on labels: object kind (synthetic.SyntheticPages.label)
and page identity (an ImageNet-like many-class task), cross-entropy on linear heads over its 128-d pooled
features, which are the metric features (as Inception's pool3), then frozen.
The frozen conditioning encoder (the DINOv2 / SigLIP stand-in) is the default job's, pages/toy_encoder.py.
`space_report` measures what a space carries (kind accuracy of the nearest other-page neighbour,
same-page retrieval) so RESULTS.md can justify it against a random-weight network of the same shape.
Left out: Inception's architecture and data.
"""
import hashlib
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import metrics  # noqa: E402
from pages import synthetic  # noqa: E402

FEATURE_PAGES_SEED = 202   # DESIGN: held-out pages, disjoint seeds from training (0), test (303) and the
#                            encoder's pages (pages/toy_encoder.PAGES_SEED, 111)
FEATURE_LR = 1e-3
FEATURE_DIM = 128           # DESIGN: width of the metric features (feature_cnn output)


def page_bank(num_pages, seed, size=32, clean=False):
    """Render every image of `num_pages` synthetic pages once -> (images (N,3,S,S), page (N,), kind (N,)).

    clean=True drops the unrelated and near-duplicate images (a labelled dataset, like ImageNet);
    otherwise the pages are web-like, with outliers (synthetic.SyntheticPages defaults)."""
    kw = dict(p_outlier=0.0, p_duplicate=0.0) if clean else {}
    pages = synthetic.SyntheticPages(num_pages, size, seed=seed, **kw)
    items = [(p, i) for p in range(len(pages)) for i in range(pages.count(p))]
    images = torch.stack([pages.image(p, i) for p, i in items])
    page = torch.tensor([p for p, _ in items])
    kind = torch.tensor([pages.label(p) for p, _ in items])
    return images, page, kind


def feature_cnn():
    """DESIGN: a VGG-style CNN (32 -> 16 -> 8 px; 32, 64, 128 channels), GroupNorm + GELU, global average
    pool -> (B, 128) features. Small enough to train in about a minute on 2 CPU cores."""
    def conv(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.GELU())
    return nn.Sequential(conv(3, 32), nn.AvgPool2d(2), conv(32, 64), conv(64, 64), nn.AvgPool2d(2),
                         conv(64, 128), conv(128, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def train_feature_net(images, page, kind, steps, batch=64, seed=0, log=print):
    """Supervised training (kind + page identity) of feature_cnn() -> frozen network."""
    torch.manual_seed(seed)
    net = feature_cnn()
    kind_head = nn.Linear(FEATURE_DIM, len(synthetic.KINDS))
    page_head = nn.Linear(FEATURE_DIM, int(page.max()) + 1)
    params = list(net.parameters()) + list(kind_head.parameters()) + list(page_head.parameters())
    opt = torch.optim.Adam(params, lr=FEATURE_LR)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(images), (batch,), generator=gen)
        g = net(images[idx])
        loss_kind = F.cross_entropy(kind_head(g), kind[idx])
        loss_page = F.cross_entropy(page_head(g), page[idx])
        opt.zero_grad(set_to_none=True)
        (loss_kind + loss_page).backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"  feature net step {step + 1}/{steps}: CE kind {loss_kind.item():.3f}, page {loss_page.item():.3f}")
    return net.eval().requires_grad_(False)


def load_feature_net(path):
    """The saved feature CNN as a metrics.FeatureNetwork: images in [-1, 1] -> (B, 128) float32."""
    net = feature_cnn()
    try:
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:
        raise ValueError(f"{path}: not a feature_cnn state dict ({type(e).__name__}: {e})") from e
    return metrics.FeatureNetwork(f"synthetic-pages CNN ({os.path.basename(path)})", net.eval().requires_grad_(False))


@torch.no_grad()
def space_report(feats, page, kind):
    """What a feature space carries, on labelled images: kind accuracy of the nearest neighbour on
    another page (semantics that generalise across pages) and same-page retrieval@1 (page identity)."""
    f = F.normalize(torch.as_tensor(feats).float(), dim=-1)
    page, kind = torch.as_tensor(page), torch.as_tensor(kind)
    d = torch.cdist(f, f)
    d.fill_diagonal_(float("inf"))
    same_page = page[:, None] == page[None, :]
    nn_any = d.argmin(1)
    nn_other = d.masked_fill(same_page, float("inf")).argmin(1)
    return {"kind_acc_nn_other_page": (kind[nn_other] == kind).float().mean().item(),
            "same_page_at_1": (page[nn_any] == page).float().mean().item(),
            "chance_kind": 1 / len(synthetic.KINDS)}


def pretrained_feature_net(out_dir, steps, bank_pages, seed=0, log=print):
    """Train (or reuse from `out_dir`) the feature network -> its .pt path.

    The file is named by a hash of its training recipe, so a changed recipe retrains; the recipe is seeded,
    so a rerun from scratch writes the same weights (up to the machine's float reductions)."""
    os.makedirs(out_dir, exist_ok=True)
    recipe = dict(name="features", steps=steps, bank_pages=bank_pages, pages_seed=FEATURE_PAGES_SEED, seed=seed,
                  lr=FEATURE_LR, v=2, **synthetic.SyntheticPages(1).style())       # what the held-out pages draw
    key = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(out_dir, f"feature_cnn_{key}.pt")
    if not os.path.exists(path):
        log(f"training the feature network ({steps} steps on {bank_pages} held-out pages, seed {FEATURE_PAGES_SEED})")
        images, page, kind = page_bank(bank_pages, FEATURE_PAGES_SEED, clean=True)
        net = train_feature_net(images, page, kind, steps, seed=seed + 1, log=log)
        torch.save(net.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)
        with open(path + ".json", "w") as f:
            json.dump(recipe, f, indent=1)
    return path
