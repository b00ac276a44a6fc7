"""Do the conditioning tokens carry the condition, and is it prominent there? sweep.py's probe part (issue 20).

Not part of the paper. Semantica's reconstruction models copy their condition (§4, Fig. 2), which needs
tokens that determine it; the small-scale study asks whether ours do. On held-out clean synthetic pages:
  - a ridge regression (dual form, standardised features) from the encoder's tokens and from its global
    feature to the condition's pixels (RMSE, [-1, 1] scale) and to its object kind (accuracy);
  - the low-rank probe: the same pixel regression from only the tokens' top-k principal components, i.e.
    whether the condition's pixels sit in the directions of the tokens' largest variance (STUDY.md finding 7);
  - the local probe: each patch from its own token alone, one map for all positions (local_fit_eval).
Encoders: the default job's random tiny encoder, a file (--encoder-weights), and the claims run's encoder
recipe (experiments/features.py) trained each of --encoder-steps steps, and the random encoder at each patch
size of --encoder-patches (other token counts, as sweep.py's patch<P> copy variants). Everything here is DESIGN.
"""
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import encoders  # noqa: E402
import features  # noqa: E402  (experiments/features.py: the claims run's pretrained networks)
from pages import synthetic  # noqa: E402
from claims_setup import ClaimsConfig  # noqa: E402  (the claims run's encoder recipe: bank pages, seed)

PROBE_PAGES_SEED = 606     # DESIGN: held-out pages of their own seed for the token probe


def ridge_fit_eval(f_tr, y_tr, f_te, y_te, lam=1e-2):
    """Ridge regression (dual form, features standardised) -> predictions on the test features."""
    mu, sd = f_tr.mean(0), f_tr.std(0) + 1e-6
    a, b = (f_tr - mu) / sd, (f_te - mu) / sd
    ym = y_tr.mean(0)
    k = a @ a.T
    alpha = torch.linalg.solve(k + lam * k.diagonal().mean() * torch.eye(len(a), dtype=a.dtype), y_tr - ym)
    return (b @ a.T) @ alpha + ym


def lowrank_fit_eval(f_tr, y_tr, f_te, k, lam=1e-2):
    """ridge_fit_eval from the top-k principal components of the features -> (test predictions, the share of
    the training features' variance those k components carry).

    The components are those of the features as the encoder emits them (centred on the training set, not
    standardised), so they are the directions of the tokens' largest variance. DESIGN: the probe of STUDY.md
    finding 7's reading that a denoiser takes up first what is prominent in its condition, not all that
    the condition determines; a full-rank probe cannot see that, it weighs every direction alike."""
    mu = f_tr.mean(0)
    _, s, vh = torch.linalg.svd(f_tr - mu, full_matrices=False)
    v = vh[:k].T                                                  # (D, k): the top-k principal directions
    share = (s[:k].square().sum() / s.square().sum()).item()
    return ridge_fit_eval((f_tr - mu) @ v, y_tr, (f_te - mu) @ v, None, lam), share


def position_shared_share(patches):
    """Share of the patch tokens' variance across images that every position shares: the variance of the
    image's mean patch token over the total, after centring each (position, channel) over the images.

    patches: (B, N, D) patch tokens -> float in [0, 1]; 1 = every position carries the same (the tokens
    hold no layout beyond what the image's mean token says), 1 / N for position-independent tokens.
    DESIGN: how much of what the tokens carry is the layout (position-specific), STUDY.md finding 7."""
    c = patches - patches.mean(0)                                 # centre every (position, channel) over images
    shared = c.mean(1, keepdim=True).expand_as(c)                 # the image's mean token, at every position
    return (shared.square().sum() / c.square().sum()).item()


def local_fit_eval(tok_tr, x_tr, tok_te, x_te, patch_size, lam=1e-2):
    """The local probe: each patch's pixels from its own patch token alone, one linear map shared by all
    positions -> pixel RMSE on the test images ([-1, 1] scale).

    tok_*: (B, G*G, D) patch tokens in raster order; x_*: (B, 3, G*P, G*P) images, P = patch_size. Tokens and
    patches are centred per position over the training images (so the map need not undo position embeddings
    or where objects tend to sit), then ridge regression in primal form (D x D; the ridge is `lam` times the
    mean squared norm of a standardised row, as ridge_fit_eval's mean kernel diagonal). DESIGN: does a token
    hold its own patch (what a denoiser copying through cross-attention reads most simply), or is the layout
    spread over the tokens, where only the full probe finds it? (STUDY.md finding 7)."""
    def patches(x):                                               # (B, 3, S, S) -> (B, G*G, 3*P*P)
        b, c, s, _ = x.shape
        g = s // patch_size
        return x.reshape(b, c, g, patch_size, g, patch_size).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, -1)
    y_tr, y_te = patches(x_tr), patches(x_te)
    t_mu, y_mu = tok_tr.mean(0), y_tr.mean(0)                      # per (position, channel)
    a = (tok_tr - t_mu).flatten(0, 1)
    sd = a.std(0) + 1e-6
    a = a / sd
    ridge = lam * a.square().sum(1).mean()
    w = torch.linalg.solve(a.T @ a + ridge * torch.eye(a.shape[1], dtype=a.dtype), a.T @ (y_tr - y_mu).flatten(0, 1))
    pred = ((tok_te - t_mu) / sd) @ w + y_mu
    return (pred - y_te).square().mean().sqrt().item()


PROBE_RANKS = (4, 16, 64)  # DESIGN: components of the low-rank probe (of 8320 token dims: 65 tokens x 128)


@torch.no_grad()
def probe(encoder_weights=None, encoder_steps=(), net_dir=None, n_train=1500, n_test=500, ranks=PROBE_RANKS, log=print,
          patches=()):
    """What a ridge regression recovers from the encoder's output on held-out clean pages: pixel RMSE of
    the condition ([-1, 1] scale) from the tokens and from the global feature, object-kind accuracy, and the
    pixel RMSE from the tokens' top-k principal components for k in `ranks` (lowrank_fit_eval) with the share
    of the patch tokens' variance that all positions share (position_shared_share).

    Encoders: the default job's random tiny encoder; the file `encoder_weights`; and, for each N in
    `encoder_steps`, the claims run's encoder recipe (features.pretrained_network) trained N steps, kept in
    `net_dir` (the claims run's is N = ClaimsConfig().encoder_steps); for each patch size P in `patches` (other
    than the tiny encoder's 4) the recipe's random encoder at P (features.tiny_config).
    Returns dict(train_images, test_images, results={row: {pixel_rmse, kind_accuracy}}, lowrank={features:
    {full, dims, position_shared and local (tokens only: local_fit_eval), "<k>": {pixel_rmse, variance_share}}});
    RMSE in [-1, 1] units."""
    pages = synthetic.SyntheticPages(800, 32, seed=PROBE_PAGES_SEED, p_outlier=0.0, p_duplicate=0.0)
    items = [(p, i) for p in range(len(pages)) for i in range(pages.count(p))][:n_train + n_test]
    x = torch.stack([pages.image(p, i) for p, i in items]).double()
    kind = torch.tensor([pages.label(p) for p, _ in items])
    y_pix, y_kind = x.flatten(1), torch.nn.functional.one_hot(kind, len(synthetic.KINDS)).double()
    encs = {"random tiny encoder (default job)": encoders.load_encoder("tiny", seed=0)}
    if encoder_weights:
        encs["trained tiny encoder (claims run)"] = encoders.from_checkpoint(encoder_weights)
    cc = ClaimsConfig()
    recipes = [(n, features.TINY.patch_size) for n in encoder_steps] + [(0, p) for p in patches
                                                                         if p != features.TINY.patch_size]
    for n, p in recipes:
        with torch.enable_grad():                                  # (training, inside this no_grad probe)
            path = features.pretrained_network(net_dir, "encoder", n, cc.bank_pages, cc.seed, log=log, patch_size=p)
        name = f"claims' encoder recipe, {n} steps" if n else "random tiny encoder"
        encs[name + ("" if p == features.TINY.patch_size else f", patch {p}")] = encoders.from_checkpoint(path)
    tr, te = slice(0, n_train), slice(n_train, None)
    rmse = lambda pred: (pred - y_pix[te]).square().mean().sqrt().item()      # noqa: E731
    res = {"baseline (mean image)": dict(pixel_rmse=(y_pix[te] - y_pix[tr].mean(0)).square().mean().sqrt().item())}
    kd = ridge_fit_eval(y_pix[tr], y_kind[tr], y_pix[te], y_kind[te])       # what a linear probe gets from pixels
    res["raw pixels (reference for kind)"] = dict(pixel_rmse=0.0, kind_accuracy=(kd.argmax(1) == kind[te]).double().mean().item())
    lowrank, shared, local = {}, {}, {}
    feats = {"raw pixels": y_pix,                 # references for what a few directions can carry:
             "mean colour (palette only)": x.mean((2, 3)),                                  # 3 numbers
             "4x4 average-pooled image (coarse layout)": F.avg_pool2d(x, x.shape[-1] // 4).flatten(1)}
    for name, enc in encs.items():
        g, tok = enc(enc.preprocess(x.float()))
        tok = tok.double()
        feats[f"{name}, tokens"] = tok.flatten(1)
        patch_tok = tok[:, -enc.num_patches:]
        shared[f"{name}, tokens"] = position_shared_share(patch_tok[tr])
        local[f"{name}, tokens"] = local_fit_eval(patch_tok[tr], x[tr], patch_tok[te], x[te], enc.patch_size)
        for part, f in (("tokens", tok.flatten(1)), ("global", g.double())):
            pix = ridge_fit_eval(f[tr], y_pix[tr], f[te], y_pix[te])
            kd = ridge_fit_eval(f[tr], y_kind[tr], f[te], y_kind[te])
            res[f"{name}, {part}"] = dict(pixel_rmse=rmse(pix),
                                          kind_accuracy=(kd.argmax(1) == kind[te]).double().mean().item())
    for name, f in feats.items():
        full = res[name]["pixel_rmse"] if name in res else rmse(ridge_fit_eval(f[tr], y_pix[tr], f[te], y_pix[te]))
        row = lowrank[name] = dict(full=full, dims=f.shape[1])   # (a token row's full probe is the table above's)
        if name in shared:
            row["position_shared"], row["local"] = shared[name], local[name]
        for k in (r for r in ranks if r < f.shape[1]):
            pred, share = lowrank_fit_eval(f[tr], y_pix[tr], f[te], k)
            row[str(k)] = dict(pixel_rmse=rmse(pred), variance_share=share)
    return dict(train_images=n_train, test_images=len(items) - n_train, results=res, lowrank=lowrank)
