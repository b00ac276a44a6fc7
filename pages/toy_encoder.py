"""The CPU job's pretrained encoder: the `tiny` ViT trained once, SigLIP-style, on held-out synthetic pages.

Not part of the paper. Semantica conditions on an encoder pretrained elsewhere on web-scale data (§3.2,
§6.2: DINOv2, SigLIP); none can be downloaded here, and a random tiny encoder's tokens carry the object
kind only weakly (a linear probe reads it at 0.29, docs/study.md section 1). The toy analogue: the `tiny`
DINOv2-architecture ViT (encoders.py) learns from the alt text of pages that the denoiser never sees (their
own seed, PAGES_SEED), with SigLIP's pairwise sigmoid loss (Zhai et al. 2023, arXiv 2303.15343, Eq. 1)
between its global (CLS) embedding and a bag-of-words embedding of the image's alt text
(synthetic.SyntheticPages.alt_text: kind, texture, colour, background). Then it is frozen and saved in the
official DINOv2 backbone layout, so it loads exactly as dinov2_vitb14_pretrain.pth does:

    path = toy_encoder.pretrained()            # the committed file (WEIGHTS_DIR); trained (~13 min on 2 cores) if the recipe changed
    encoder = encoders.load_encoder("tiny", weights=path)

DESIGN throughout (no paper source); docs/differences.md has the row. Left out: SigLIP's text transformer
(a bag of words suffices for four-word alt text) and its attention-pooling head (the CLS token is the
global embedding, as in DINOv2).
"""
import hashlib
import json
import os

import torch
import torch.nn.functional as F
from torch import nn

import encoders
from pages import synthetic

PAGES_SEED = 111   # DESIGN: held-out pages of their own seed (training pages: 0, claims test: 303, kinds: 404/405)
PAGES = 1500       # DESIGN: ~7 500 images
STEPS = 2000       # DESIGN: Adam steps of batch BATCH
BATCH = 64
LR = 1e-3
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")  # committed here
EMBED = 64         # width of the shared image-text space (a projection of the CLS, as SigLIP's head)


def alt_text_bank(num_pages, seed, size=32):
    """Every image of `num_pages` synthetic pages (seed `seed`) -> (images (N, 3, S, S) in [-1, 1],
    word ids (N, 4) into synthetic.WORDS)."""
    pages = synthetic.SyntheticPages(num_pages, size, seed=seed)
    items = [(p, i) for p in range(num_pages) for i in range(pages.count(p))]
    ids = [[synthetic.WORDS.index(w) for w in pages.alt_text(p, i)] for p, i in items]
    return torch.stack([pages.image(p, i) for p, i in items]), torch.tensor(ids)


def sigmoid_loss(image_embed, text_embed, same, log_t, b):
    """SigLIP's loss (arXiv 2303.15343, Eq. 1) over a batch: -1/|B| sum_ij log sigmoid(z_ij (t x_i.y_j + b)),
    z_ij = +1 for matching pairs, -1 otherwise. image_embed, text_embed: (B, E) L2-normalised; same: (B, B)
    bool, True where image i and text j match (identical alt texts also match: a bag of words cannot tell
    them apart); log_t, b: learned scalars (init log 10 and -10, as the paper)."""
    logits = image_embed @ text_embed.T * log_t.exp() + b
    z = same.float() * 2 - 1
    return -F.logsigmoid(z * logits).sum() / len(image_embed)


def train_encoder(steps=STEPS, num_pages=PAGES, batch=BATCH, lr=LR, seed=0, log=print):
    """Train the `tiny` encoder (random init of `seed`) on held-out pages -> frozen encoders.VisionEncoder."""
    torch.manual_seed(seed)
    images, words = alt_text_bank(num_pages, PAGES_SEED)
    enc = encoders.load_encoder("tiny", seed=seed).requires_grad_(True).train()
    text = nn.EmbeddingBag(len(synthetic.WORDS), EMBED, mode="sum")   # the text tower: a bag of words
    proj = nn.Linear(enc.dim, EMBED)
    log_t, b = nn.Parameter(torch.tensor(10.0).log()), nn.Parameter(torch.tensor(-10.0))
    opt = torch.optim.Adam([*enc.parameters(), *text.parameters(), *proj.parameters(), log_t, b], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(images), (batch,), generator=gen)
        w = words[idx]
        x = F.normalize(proj(enc.encode(images[idx])[0]), dim=-1)        # encode: the frozen forward, with autograd
        y = F.normalize(text(w), dim=-1)
        loss = sigmoid_loss(x, y, (w[:, None] == w[None]).all(-1), log_t, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0 or step == 0:
            log(f"toy encoder: step {step + 1}/{steps}, sigmoid loss {loss.item():.3f}")
    return enc.eval().requires_grad_(False)


def recipe(steps=STEPS, num_pages=PAGES, batch=BATCH, lr=LR, seed=0):
    """What the weights are a function of (their file is named by its hash)."""
    return dict(steps=steps, pages=num_pages, pages_seed=PAGES_SEED, batch=batch, lr=lr, seed=seed, embed=EMBED,
                words=list(synthetic.WORDS), style=synthetic.SyntheticPages(1).style(), v=1)


def pretrained(cache_dir=WEIGHTS_DIR, log=print, **kw):
    """Train once (or reuse) the toy encoder -> the path of its DINOv2-layout .pth in `cache_dir` (absolute).

    The file is named by a hash of its recipe, so a changed recipe retrains; written atomically, with the
    recipe beside it as JSON. The training is seeded: a rerun writes the same weights up to the machine's float
    rounding, which the checkpoint's sha256 of the file then tells apart."""
    rec = recipe(**kw)
    key = hashlib.sha1(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.abspath(os.path.join(cache_dir, f"tiny_siglip_{key}.pth"))
    if not os.path.exists(path):
        os.makedirs(cache_dir, exist_ok=True)
        log(f"training the toy encoder once ({rec['steps']} steps on {rec['pages']} held-out pages) -> {path}")
        enc = train_encoder(log=log, **kw)
        tmp = f"{path}.tmp{os.getpid()}"
        encoders.save_dinov2(enc, tmp)
        with open(path + ".json", "w") as f:
            json.dump(rec, f, indent=1)
        os.replace(tmp, path)
    return path
