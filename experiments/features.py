"""The two pretrained networks the claims experiments need, trained here on held-out synthetic pages.

Semantica (arXiv 2405.14857) relies on two networks trained elsewhere, on other data:
  - the frozen conditioning encoder, DINOv2 (self-supervised, §3.2, §6.2), whose tokens condition the
    denoiser and whose global embedding filters the training pairs (§5, App. C);
  - the metric feature network, Inception-v3 trained on ImageNet labels (FID, precision/recall, §7, §8.2).
No weights can be downloaded here, and a random-weight network gives metrics without meaning. So both are
trained from scratch on synthetic pages that the diffusion models never see (their own seeds), then
frozen. The encoder is saved in the official DINOv2 backbone layout (encoders.save_dinov2) and loaded
back through encoders.from_checkpoint / train.py --encoder-weights, exactly as dinov2_vitb14_pretrain.pth.

  - encoder ("DINOv2" stand-in): the `tiny` DINOv2-architecture ViT, trained self-supervised with a
    symmetric InfoNCE loss between two images of the same page (the §5 hypothesis: images of one page
    share semantics). Like SimCLR, the loss acts on a projection head; the CLS embedding is the output.
  - feature network ("Inception" stand-in): a small CNN (another architecture, other pages), trained
    *supervised* on labels: object kind (synthetic.SyntheticPages.label) and page identity (an
    ImageNet-like many-class task), cross-entropy on linear heads over its 128-d pooled features,
    which are the metric features (as Inception's pool3). A CNN learns the shape label much faster
    than the tiny ViT here (measured on the earlier 1-3-object pages: kind accuracy 0.36 vs chance
    after 600 steps).
`space_report` measures what a space carries (kind accuracy of the nearest other-page neighbour,
same-page retrieval) so RESULTS.md can justify it against a random-weight network of the same shape.
Left out: DINOv2's actual objective (self-distillation + iBOT masking), augmentations.
"""
import hashlib
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import encoders  # noqa: E402
import metrics  # noqa: E402
from pages import synthetic  # noqa: E402

ENCODER_PAGES_SEED = 101   # DESIGN: held-out pages, disjoint seeds from training (0) and test pages
FEATURE_PAGES_SEED = 202
TEMPERATURE = 0.1          # DESIGN: InfoNCE temperature (SimCLR's 0.1)
ENCODER_LR = 1e-3          # DESIGN: Adam, short schedule; converges in ~200 steps on this data
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


def _trainable_tiny(seed):
    """A randomly initialised `tiny` encoder with gradients on, and its differentiable encode."""
    enc = encoders.load_encoder("tiny", seed=seed).requires_grad_(True).train()   # 8 x 8 patch tokens + CLS
    # forward() is no_grad (the encoder is frozen in Semantica); encode() is the same computation
    # with autograd, so the architecture and its normalisation stay exactly encoders.py's.
    return enc, lambda x: enc.encode(x)[0]            # global (CLS) embedding (B, D)


def _two_per_page(page, batch_pages, gen):
    """Indices of two distinct images from each of `batch_pages` random pages with >= 2 images."""
    members = {}
    for i, p in enumerate(page.tolist()):
        members.setdefault(p, []).append(i)
    multi = [m for m in members.values() if len(m) >= 2]
    chosen = torch.randperm(len(multi), generator=gen)[:batch_pages].tolist()
    a, b = [], []
    for c in chosen:
        i, j = torch.randperm(len(multi[c]), generator=gen)[:2].tolist()
        a.append(multi[c][i])
        b.append(multi[c][j])
    return torch.tensor(a), torch.tensor(b)


def train_encoder(images, page, steps, batch_pages=32, seed=0, log=print):
    """Self-supervised page-contrastive training of the `tiny` DINOv2 ViT -> frozen encoder; 0 steps: the
    random encoder of `seed`."""
    torch.manual_seed(seed)
    enc, embed = _trainable_tiny(seed)
    head = nn.Sequential(nn.Linear(enc.dim, enc.dim), nn.GELU(), nn.Linear(enc.dim, 64))  # SimCLR projection
    opt = torch.optim.Adam(list(enc.parameters()) + list(head.parameters()), lr=ENCODER_LR)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        a, b = _two_per_page(page, batch_pages, gen)
        z = F.normalize(head(embed(torch.cat([images[a], images[b]]))), dim=-1)
        za, zb = z.chunk(2)
        logits = za @ zb.T / TEMPERATURE                     # (P, P): positives on the diagonal
        target = torch.arange(len(a))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"  encoder step {step + 1}/{steps}: InfoNCE {loss.item():.3f}")
    return enc.eval().requires_grad_(False)


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


def pretrained_network(out_dir, name, steps, bank_pages, seed=0, log=print):
    """Train (or reuse from `out_dir`) one network, name "encoder" or "features" -> its .pth / .pt path.

    The file is named by a hash of its training recipe, so a changed recipe retrains; the recipe is seeded,
    so a rerun from scratch writes the same weights (up to the machine's float reductions). ValueError for
    another name."""
    if name not in ("encoder", "features"):
        raise ValueError(f"name must be 'encoder' or 'features', got {name!r}")
    os.makedirs(out_dir, exist_ok=True)
    pseed = ENCODER_PAGES_SEED if name == "encoder" else FEATURE_PAGES_SEED
    recipe = dict(name=name, steps=steps, bank_pages=bank_pages, pages_seed=pseed, seed=seed,
                  lr=ENCODER_LR if name == "encoder" else FEATURE_LR, temperature=TEMPERATURE, v=1,
                  **synthetic.SyntheticPages(1).style())       # what the held-out pages draw
    key = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(out_dir, f"tiny_dinov2_encoder_{key}.pth" if name == "encoder"  # DINOv2 layout
                        else f"feature_cnn_{key}.pt")
    if not os.path.exists(path):
        log(f"training the {name} network ({steps} steps on {bank_pages} held-out pages, seed {pseed})")
        images, page, kind = page_bank(bank_pages, pseed, clean=name == "features")
        if name == "encoder":
            net = train_encoder(images, page, steps, seed=seed, log=log)
            encoders.save_dinov2(net, path + ".tmp")         # read back by encoders.from_checkpoint
        else:
            net = train_feature_net(images, page, kind, steps, seed=seed + 1, log=log)
            torch.save(net.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)
        with open(path + ".json", "w") as f:
            json.dump(recipe, f, indent=1)
    return path


def pretrained(out_dir, encoder_steps, feature_steps, bank_pages, seed=0, log=print):
    """Both networks (pretrained_network) -> (encoder .pth path, feature net .pth path)."""
    return (pretrained_network(out_dir, "encoder", encoder_steps, bank_pages, seed, log),
            pretrained_network(out_dir, "features", feature_steps, bank_pages, seed, log))
