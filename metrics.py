"""FID, improved precision/recall and the K-shot evaluation of image variations (Semantica §7, §8.2).

Semantica (arXiv 2405.14857v3) §7 argues that full-set FID and recall reward a model that copies its
conditioning image, and proposes the K-shot protocol: from N test images pick K conditioning images,
generate N/K samples from each, and compare the N test images with the N samples (§8.2: one-shot
ImageNet, ten test images per class, one conditioning image per class). §8.2 (Fig. 5) adds alignment:
cosine similarity between a conditioning image and its samples in an encoder's embedding space.

Everything below is a pure function over feature arrays (numpy or torch, CPU or CUDA), arguments
real first:
- FID (Heusel et al. 2017), the formula of pytorch-fid / clean-fid / torchmetrics: float64 mean and
  unbiased covariance, tr √(Σ₁Σ₂) from the eigenvalues of the symmetric Lᵀ Σ₂ L (Σ₁ = L Lᵀ)
  instead of scipy's sqrtm (slow, and broken in several scipy releases).
- Improved precision/recall (Kynkäänniemi et al. 2019, kynkaat/improved-precision-and-recall-metric
  @b0247ea): Euclidean k-NN radius excluding the point itself, k = 3, membership with ≤; distances
  in tiles, so memory stays O(tile + N) instead of the N × N matrix (10 GB at N = 50k), and the
  real–fake tiles screened in bfloat16 under a rigorous error bound (same answer as float32).
- The K-shot plan (which test images condition how many samples), alignment, feature networks
  (Inception-v3 pool3 from inception.py, DINOv2 global embedding from encoders.py) and a CLI.
Shapes: N real / M generated samples, D feature width. FID values are comparable only for the same
feature network, preprocessing and N (FID's bias is ≈ ∝ 1/N).
Not implemented: KID, density/coverage, the realism score, FD∞ extrapolation.
"""
import argparse
import json
import sys
import time
import warnings
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch

K_NN = 3                 # Kynkäänniemi et al. 2019 (nhood_sizes=[3]); Semantica §7 "Kth nearest neighbor"
BLOCK = 2048             # DESIGN: 2048 × 2048 float32 distance tiles (16 MiB): GEMM-efficient, memory flat in N
BLOCK_CUDA = 8192        # DESIGN: 256 MiB tiles on GPUs, where small tiles would leave the GEMMs launch-bound
DUPLICATE_RTOL = 1e-5    # DESIGN: squared distances below 1e-5 · max‖x − mean‖² are float32 rounding noise
                         # of ‖x‖² + ‖y‖² − 2x·y (measured ≤ 1e-6); they count as 0 so copies tie exactly

PrecisionRecall = namedtuple("PrecisionRecall", "precision recall")


def _features(x, name, min_rows=2):
    """(N, D) numpy array or tensor -> tensor on its own device; clear errors for bad input."""
    x = torch.from_numpy(np.ascontiguousarray(x)) if not torch.is_tensor(x) else x.detach()
    if x.ndim != 2:
        raise ValueError(f"{name}: expected features of shape (N, D), got {tuple(x.shape)}")
    if len(x) < min_rows:
        raise ValueError(f"{name}: needs at least {min_rows} samples, got {len(x)}")
    if x.dtype not in (torch.float32, torch.float64):               # ints, float16, bfloat16
        x = x.float()
    if not torch.isfinite(x.sum(0)).all():            # NaN/inf reach the column sums; no N × D temporary
        bad = x.numel() - torch.isfinite(x).sum().item()
        if bad:
            raise ValueError(f"{name}: {bad} NaN/inf values in the features")
    return x


def _same_width(a, b):
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: real D={a.shape[1]}, fake D={b.shape[1]}")


# ----------------------------------------------------------------------------------------------- FID
def feature_stats(feats, block_rows=4096):
    """Mean and unbiased covariance (np.cov(x, rowvar=False)) in float64, as numpy arrays.

    CPU: numpy over row blocks, so memory is O(block · D + D²) rather than a float64 copy of all
    N × D features (numpy's `a.T @ a` is a symmetric rank-k update, 2× faster than torch's float64
    GEMM on our CPUs). GPU: one float64 GEMM."""
    x = _features(feats, "features")
    n = len(x)
    if x.device.type != "cpu":
        x = x.double()
        mu = x.mean(0)
        xc = x - mu                                              # (N, D)
        return mu.cpu().numpy(), (xc.T @ xc / (n - 1)).cpu().numpy()
    x = x.numpy()
    mu = sum(x[i:i + block_rows].sum(0, dtype=np.float64) for i in range(0, n, block_rows)) / n
    sigma = np.zeros((x.shape[1], x.shape[1]))
    for i in range(0, n, block_rows):
        xc = x[i:i + block_rows].astype(np.float64) - mu         # (b, D)
        sigma += xc.T @ xc
    return mu, sigma / (n - 1)


def _trace_sqrt_product(sigma1, sigma2):
    """tr √(Σ₁Σ₂) = Σᵢ √λᵢ(Lᵀ Σ₂ L) for any factor Σ₁ = L Lᵀ.

    Σ₁Σ₂ = L (Lᵀ Σ₂) and (Lᵀ Σ₂) L share their non-zero eigenvalues, and Lᵀ Σ₂ L is symmetric PSD, so
    eigvalsh applies and nothing complex can leak out. L is the Cholesky factor (fast); when Σ₁ is
    singular (N ≤ D) it is V·diag(√w) from eigh(Σ₁) with negative rounding in w clipped to 0."""
    try:
        L = np.linalg.cholesky(sigma1)
    except np.linalg.LinAlgError:
        w, V = np.linalg.eigh(sigma1)
        L = V * np.sqrt(np.clip(w, 0, None))
    M = L.T @ sigma2 @ L
    lam = np.linalg.eigvalsh((M + M.T) / 2)                        # symmetrise rounding before eigvalsh
    return np.sqrt(np.clip(lam, 0, None)).sum()


def fid_from_stats(mu1, sigma1, mu2, sigma2):
    """FID = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr √(Σ₁Σ₂)  (Heusel et al. 2017).

    Not clamped: identical sets give ≈ ±1e-9 rather than exactly 0."""
    mu1, mu2 = (np.asarray(m, dtype=np.float64) for m in (mu1, mu2))
    sigma1, sigma2 = (np.asarray(s, dtype=np.float64) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
                 - 2 * _trace_sqrt_product(sigma1, sigma2))


def frechet_distance(real, fake):
    """FID between two feature sets (N, D) and (M, D); N ≤ D works but is dominated by bias."""
    real, fake = _features(real, "real"), _features(fake, "fake")
    _same_width(real, fake)
    if min(len(real), len(fake)) <= real.shape[1]:
        warnings.warn(f"FID with {min(len(real), len(fake))} samples ≤ D = {real.shape[1]}: "
                      "singular covariance, the value is mostly sample-size bias")
    return fid_from_stats(*feature_stats(real), *feature_stats(fake))


def save_stats(path, mu, sigma):
    """Reference statistics as .npz with arrays `mu` (D,) and `sigma` (D, D) (pytorch-fid layout)."""
    np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def load_stats(path):
    with np.load(path) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path}: expected arrays 'mu' and 'sigma', found {sorted(f.files)}")
        return f["mu"], f["sigma"]


# ------------------------------------------------------------------------------ precision / recall
# Squared distances ‖x‖² + ‖y‖² − 2x·y in float32 (the reference's convention), in tiles.
# Screening (DESIGN, exact): the real–fake tiles, which only feed ≤ tests against known radii, run
# their GEMM in bfloat16 (2.5× the float32 rate on CPUs with AVX512-BF16, far more on GPUs) with a
# rigorous bound on the error; the few pairs the bound leaves undecided are recomputed in float32.
# The answer is the float32 answer. The radii (k-th smallest distances) stay float32 throughout.
BF16_U, FP32_U = 2.0 ** -8, 2.0 ** -24   # unit roundoffs: 8- and 24-bit significands
MAX_OPEN = 16            # DESIGN: undecided pairs per tile row, on average, before those rows are redone
                         # as a float32 GEMM instead of pair by pair (many near-ties, e.g. copies)

Screen = namedtuple("Screen", "x16 sq a b")   # a tile's rows: bf16 copy x̃ of x, ‖x‖², ‖x̃‖, ‖x − x̃‖


def _fast_bf16(device):
    """bf16 GEMMs beat float32 on GPUs and on CPUs with AVX512-BF16 or AMX, not elsewhere."""
    if device.type == "cuda":
        return True
    cpu = torch.cpu
    return device.type == "cpu" and any(getattr(cpu, f, lambda: False)()
                                        for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def _bf16_norms(x, block):
    """‖x̃‖ and ‖x − x̃‖ per row, x̃ = bf16(x), built in row blocks."""
    a, b = torch.empty(len(x), device=x.device), torch.empty(len(x), device=x.device)
    for s in range(0, len(x), block):
        rounded = x[s:s + block].bfloat16().float()
        a[s:s + block] = torch.linalg.vector_norm(rounded, dim=1)
        b[s:s + block] = torch.linalg.vector_norm(rounded.sub_(x[s:s + block]), dim=1)
    return a, b


def _screen(x, sq, norms, rows):
    """Screen of rows `rows`; the bf16 copy is made per tile, so no bf16 copy of the set is kept."""
    return Screen(x[rows].bfloat16(), sq[rows], norms[0][rows], norms[1][rows])


def _sq_dists(x, y, sq_x, sq_y):
    """(b, D), (c, D) -> (b, c) squared Euclidean distances ‖x‖² + ‖y‖² − 2 x·y (may dip below 0)."""
    return torch.addmm(sq_y[None, :], x, y.T, alpha=-2).add_(sq_x[:, None])


def _screened_sq_dists(p, q):
    """bf16 squared distances between the rows of Screens p and q, and a bound on the absolute error
    against exact arithmetic on the float32 inputs (plus the float32 recomputation's own rounding)."""
    g = p.x16 @ q.x16.T                                          # float32 accumulation, bf16 result
    d2 = torch.add(q.sq[None, :], g, alpha=-2).add_(p.sq[:, None])
    lo, hi = g.aminmax()
    g_max = max(-lo.item(), hi.item())
    a1, b1, s1, a2, b2, s2 = (t.max().item() for t in (p.a, p.b, p.sq, q.a, q.b, q.sq))
    gamma = 2 * p.x16.shape[1] * FP32_U          # float32 sums of D terms (Higham's γ_D, doubled)
    # |g − x·y| ≤ |x̃·(y − ỹ)| + |(x − x̃)·ỹ| + |(x − x̃)·(y − ỹ)| (Cauchy–Schwarz), + sums, + bf16 result
    dot = a1 * b2 + b1 * a2 + b1 * b2 + gamma * a1 * a2 + 2 * BF16_U * g_max
    # + float32 rounding of ‖x‖², of forming d2, and of the float32 value it is compared against
    return d2, 1.01 * (2 * dot + 2 * gamma * (s1 + s2 + 2 * g_max))


def _keep_smallest(best, d2):
    """Merge a tile's rows into the running k+1 smallest squared distances per point, in place."""
    new = d2.topk(min(best.shape[1], d2.shape[1]), dim=1, largest=False).values
    best.copy_(torch.cat([best, new], 1).topk(best.shape[1], dim=1, largest=False).values)


def _radii_sq(x, sq, k, block, floor):
    """Squared distance of each point to its k-th nearest neighbour in its own set, itself excluded.

    The distance matrix is symmetric: each tile (i, j ≥ i) is computed once and serves the rows of
    block i and, transposed, those of block j (half the GEMM work of a full pass)."""
    n = len(x)
    best = torch.full((n, k + 1), float("inf"), device=x.device)  # k+1 smallest, the 0 to itself included
    for i in range(0, n, block):
        for j in range(i, n, block):
            d2 = _sq_dists(x[i:i + block], x[j:j + block], sq[i:i + block], sq[j:j + block])
            _keep_smallest(best[i:i + block], d2)
            if j > i:
                _keep_smallest(best[j:j + block], d2.T.contiguous())
    return best[:, k].clamp_(min=floor)                         # duplicates: radius 0 -> rounding floor


def _inside(d2, err, r2, x, y):
    """Which row points of a tile lie in some column point's ball, d2 ≤ r2 — exact, given that d2 is
    within ±err of the true squared distances: only rows the bound cannot decide are recomputed."""
    slack = torch.sub(d2, r2[None, :])                          # ≤ 0: inside that ball
    lo = slack.amin(1)
    inside = lo <= -err
    undecided = (lo <= err) & ~inside
    if err and undecided.any():
        rows = undecided.nonzero().squeeze(1)
        r, c = (slack[rows] <= err).nonzero(as_tuple=True)
        if len(r) <= MAX_OPEN * len(d2):                           # pair by pair, from the differences
            hit = (x[rows[r]] - y[c]).square_().sum(1) <= r2[c]
            inside[rows[r[hit]]] = True
        else:                                                     # float32 GEMM for those rows
            xr = x[rows]
            exact = _sq_dists(xr, y, xr.square().sum(1), y.square().sum(1))
            inside[rows] = (exact - r2[None, :]).amin(1) <= 0
    return inside


def precision_recall(real, fake, k=K_NN, *, block=None, device=None, screen=None):
    """Improved precision and recall (Kynkäänniemi et al. 2019) -> PrecisionRecall(precision, recall).

    precision = fraction of fakes inside the real manifold ⋃ B(r, r_k(r)), recall = fraction of reals
    inside the fake manifold; r_k = distance to the k-th nearest neighbour in the point's own set,
    excluding the point itself (duplicates count, at distance 0); inside means ‖·‖ ≤ r_k (the
    reference convention, so an exact copy is inside). Distances are float32 (TF32 off) in tiles on
    `device` (default: the inputs' device); memory: both sets centred (a float32 copy) plus
    O(block² + N), not the N × N matrix. `screen` (default: where bf16 GEMMs are fast) runs the
    real–fake tiles in bf16 with an error bound and recomputes the pairs it leaves open: same
    result, less time."""
    real, fake = _features(real, "real", k + 1), _features(fake, "fake", k + 1)
    _same_width(real, fake)
    device = torch.device(device) if device else fake.device
    real, fake = real.to(device, torch.float32), fake.to(device, torch.float32)
    block = block or (BLOCK_CUDA if real.is_cuda else BLOCK)
    screen = _fast_bf16(device) if screen is None else screen
    flags = torch.backends.cuda.matmul
    saved = flags.allow_tf32, flags.allow_bf16_reduced_precision_reduction
    flags.allow_tf32 = False                          # TF32's 10-bit mantissa would blur the radii
    flags.allow_bf16_reduced_precision_reduction = False   # the screen's bound assumes float32 sums
    try:
        mean = real.mean(0, dtype=torch.float64).float()
        real, fake = real - mean, fake - mean    # distances stay; the float32 cancellation in
                                                 # ‖x‖² + ‖y‖² − 2x·y shrinks with ‖x‖ (features far from 0)
        sq_r, sq_f = (torch.linalg.vector_norm(x, dim=1).square() for x in (real, fake))  # ‖x‖²
        floor = DUPLICATE_RTOL * max(sq_r.max().item(), sq_f.max().item())
        # DESIGN: radius tiles are half of `block`: the diagonal tiles, computed in full, then waste
        # 1/4 of their area instead of 1/2 (one 10k set on 2 CPU cores: 1.78 s against 2.30 s)
        radius_block = max(block // 2, 1)
        r2_real = _radii_sq(real, sq_r, k, radius_block, floor)  # (N,)
        r2_fake = _radii_sq(fake, sq_f, k, radius_block, floor)  # (M,)
        if screen:
            norms_r, norms_f = _bf16_norms(real, block), _bf16_norms(fake, block)
        fake_in_real = torch.zeros(len(fake), dtype=torch.bool, device=device)
        real_in_fake = torch.zeros(len(real), dtype=torch.bool, device=device)
        for i in range(0, len(fake), block):                     # each real–fake tile serves both
            fi = slice(i, i + block)
            screen_f = _screen(fake, sq_f, norms_f, fi) if screen else None
            for j in range(0, len(real), block):
                rj = slice(j, j + block)
                if screen:
                    d2, err = _screened_sq_dists(screen_f, _screen(real, sq_r, norms_r, rj))
                else:
                    d2, err = _sq_dists(fake[fi], real[rj], sq_f[fi], sq_r[rj]), 0.0
                fake_in_real[fi] |= _inside(d2, err, r2_real[rj], fake[fi], real[rj])     # precision
                real_in_fake[rj] |= _inside(d2.T, err, r2_fake[fi], real[rj], fake[fi])   # recall
    finally:
        flags.allow_tf32, flags.allow_bf16_reduced_precision_reduction = saved
    return PrecisionRecall(fake_in_real.sum().item() / len(fake), real_in_fake.sum().item() / len(real))


# ------------------------------------------------------------------------------ K-shot protocol
def balanced_subset(groups, per_group, seed=0):
    """Indices of `per_group` random images of every group, sorted (§8.2: "ten images randomly
    per-class ... a ground truth set of 10000 images")."""
    rng, members = np.random.default_rng(seed), _members(groups)
    small = {g: len(idx) for g, idx in members.items() if len(idx) < per_group}
    if small:
        raise ValueError(f"{len(small)} groups have fewer than {per_group} images, e.g. "
                         f"{dict(list(small.items())[:5])}")
    return np.sort(np.concatenate([rng.choice(idx, per_group, replace=False)
                                   for idx in members.values()]))


def _members(groups):
    members = {}
    for i, g in enumerate(groups):
        members.setdefault(g.item() if hasattr(g, "item") else g, []).append(i)
    return members


def kshot_select(groups, k, seed=0):
    """The K-shot plan (§7): for each group (class / page) of n test images pick k of them (seeded)
    as conditioning images and give them n samples in all (n // k each, the first n % k one more),
    so the plan generates exactly N samples. -> list of (cond_index, num_samples).

    groups: one group id per test image. k=None is the full-dataset protocol (every test image
    conditions one sample). For §7's ungrouped form ("select K of N") pass one group: [0] * N."""
    rng, plan = np.random.default_rng(seed), []
    for g, idx in _members(groups).items():
        kg = len(idx) if k is None else k
        if not 1 <= kg <= len(idx):
            raise ValueError(f"group {g!r} has {len(idx)} test images; cannot pick k={k} of them")
        chosen = np.sort(rng.choice(idx, kg, replace=False))
        base, extra = divmod(len(idx), kg)
        plan += [(int(c), base + int(j < extra)) for j, c in enumerate(chosen)]
    return plan


def kshot_metrics(real_feats, fake_feats, k_nn=K_NN):
    """FID, precision and recall between the N test images and the N K-shot samples (§7)."""
    if len(real_feats) != len(fake_feats):
        raise ValueError(f"the K-shot protocol compares N test images with N samples; got "
                         f"{len(real_feats)} and {len(fake_feats)}")
    p, r = precision_recall(real_feats, fake_feats, k=k_nn)
    return {"fid": frechet_distance(real_feats, fake_feats), "precision": p, "recall": r,
            "n": len(real_feats), "k_nn": k_nn}


def alignment(cond_emb, sample_emb, counts=None):
    """Mean cosine similarity between each sample's embedding and its conditioning image's (§8.2).

    cond_emb (K, D); sample_emb (K, S, D), or (N, D) ordered by condition with `counts` (K,) samples
    per condition (e.g. the num_samples of kshot_select). INTERPRETATION: every sample weighs equally."""
    c = _features(cond_emb, "cond_emb", 1).double()
    s = sample_emb if torch.is_tensor(sample_emb) else torch.from_numpy(np.asarray(sample_emb))
    if s.ndim == 3:
        counts, s = [s.shape[1]] * s.shape[0], s.reshape(-1, s.shape[-1])
    s = _features(s, "sample_emb", 1).double().to(c.device)
    counts = [1] * len(c) if counts is None else [int(n) for n in counts]
    if len(counts) != len(c) or sum(counts) != len(s):
        raise ValueError(f"{len(c)} conditions with counts summing to {sum(counts)} do not match "
                         f"{len(s)} sample embeddings")
    owner = torch.repeat_interleave(c, torch.tensor(counts, device=c.device), dim=0)   # (N, D)
    return torch.nn.functional.cosine_similarity(owner, s, dim=1).mean().item()


# ---------------------------------------------------------------------------- feature networks
class FeatureNetwork(torch.nn.Module):
    """images in [-1, 1] (B, 3, H, W) -> features (B, D) float32; `.name` says which network."""

    def __init__(self, name, net, preprocess=None):
        super().__init__()
        self.name, self.net, self.preprocess = name, net, preprocess

    @torch.no_grad()
    def forward(self, images):
        if self.preprocess is not None:
            images = self.preprocess(images)
        out = self.net(images)
        return (out[0] if isinstance(out, tuple) else out).float()   # encoders return (global, tokens)


def feature_network(name, weights=None, device="cpu"):
    """"inception": FID's Inception-v3 pool3 (2048-d; inception.py, weights
    pt_inception-2015-12-05-6726825d.pth). Any encoders.py name ("dinov2-l14", ...): the encoder's
    global embedding after its eval preprocessing (FD-DINOv2 uses dinov2-l14, dgm-eval)."""
    if name == "inception":
        import inception
        if weights is None:
            raise ValueError("Inception features need --weights pt_inception-2015-12-05-6726825d.pth "
                             "(the standard FID weights file)")
        net = FeatureNetwork(f"inception-v3 pool3 ({Path(weights).name})", inception.load_inception(weights))
    else:
        import encoders
        enc = encoders.load_encoder(name, weights)
        src = Path(weights).name if weights else "RANDOM weights"
        if weights is None and name != "tiny":
            warnings.warn(f"{name} without weights: random features, the metrics are meaningless")
        net = FeatureNetwork(f"{name} global embedding ({src})", enc, enc.preprocess)
    return net.to(device).eval()


def image_files(folder):
    """Image files below `folder`, recursively, sorted."""
    exts = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in exts)
    if not files:
        raise ValueError(f"{folder}: no image files found")
    return files


def extract_features(net, images, batch_size=64, device="cpu", progress=True, size=None):
    """Features (N, D) float32 numpy of an image folder or an iterable of (3, H, W) / (B, 3, H, W)
    tensors in [-1, 1]. Folder images are decoded by data.py (RGB, EXIF, unreadable files skipped
    with a logged reason) and resized+centre-cropped to `size` (default: the first image's)."""
    if isinstance(images, (str, Path)):
        import data
        images = data.iter_images(image_files(images), size)
    feats, batch, t_last = [], [], time.time()

    def flush():
        feats.append(net(torch.cat(batch).to(device)).cpu())
        batch.clear()

    for img in images:
        batch.append(img[None] if img.ndim == 3 else img)
        if sum(len(b) for b in batch) >= batch_size:
            flush()
            if progress and time.time() - t_last > 5:
                t_last = time.time()
                print(f"features [{getattr(net, 'name', 'net')}]: {sum(map(len, feats))} images", file=sys.stderr)
    if batch:
        flush()
    if not feats:
        raise ValueError("no readable images to extract features from")
    return torch.cat(feats).numpy()


# -------------------------------------------------------------------------------------------- CLI
def main(argv=None):
    ap = argparse.ArgumentParser(description="FID and precision/recall between two feature files "
                                 "(.npy, (N, D)) or two image folders.")
    ap.add_argument("real"), ap.add_argument("fake")
    ap.add_argument("--k", type=int, default=K_NN, help="k of the k-NN radius (default 3)")
    ap.add_argument("--features", default="dinov2-l14",
                    help="network for image folders: inception or an encoders.py name (FD-DINOv2 default)")
    ap.add_argument("--weights", help="weights file of the feature network")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    paths = [Path(args.real), Path(args.fake)]
    for p in paths:
        if not p.exists():
            ap.error(f"{p}: no such file or folder")
    if all(p.is_dir() for p in paths):
        net = feature_network(args.features, args.weights, args.device)
        real, fake = (extract_features(net, p, args.batch_size, args.device) for p in paths)
        source = net.name
    elif all(p.suffix == ".npy" for p in paths):
        real, fake = (np.load(p) for p in paths)
        source = "precomputed (.npy)"
    else:
        ap.error(f"give two .npy feature files or two image folders, not {args.real} and {args.fake}")
    try:
        out = {"fid": frechet_distance(real, fake)}
        out.update(precision_recall(real=real, fake=fake, k=args.k)._asdict())
    except ValueError as e:
        ap.error(str(e))
    out.update(k=args.k, n_real=len(real), n_fake=len(fake), features=source)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
