"""FID, improved precision/recall, the K-shot protocol and alignment (Semantica §7, §8.2).

The paper's definitions, in the order they are written below (real/test features R (N, D),
generated features G (M, D)):
- FID (Heusel et al. 2017; §7, §8.2, Tables 1-2):  ‖μ_R − μ_G‖² + tr Σ_R + tr Σ_G − 2 tr √(Σ_R Σ_G),
  μ the mean and Σ the unbiased covariance, float64 (pytorch-fid / clean-fid / torchmetrics).
- Precision/recall (Kynkäänniemi et al. 2019, recapped in §7): r_k(x; S) = distance from x to its k-th
  nearest neighbour in its own set S, x itself not counted (copies of x count, at distance 0), k = 3.
  precision = (1/M) Σ_g 1[∃ r ∈ R: ‖g − r‖ ≤ r_k(r; R)]   (quality: fakes inside the real manifold)
  recall    = (1/N) Σ_r 1[∃ g ∈ G: ‖r − g‖ ≤ r_k(g; G)]   (diversity: reals inside the fake manifold)
  "≤", as the reference code: an exact copy is inside (§7: "the distance ... is zero, which will
  always be less than its threshold"). Distances are Σ(x − y)² in float64, row-chunked.
- K-shot plan (§7): of N test images pick K at random and generate N/K samples from each; compare
  the N test images with the N samples. §8.2's one-shot ImageNet: per class 10 images, K = 1.
- Alignment (§8.2, Fig. 5): mean cosine similarity between each sample's global embedding and the
  embedding of ITS OWN conditioning image.
The fast precision/recall path (GEMM screening under a per-pair error bound, same answer) is in
metrics_fast.py; feature networks (Inception-v3 pool3: inception.py; encoders.py's global embedding),
folder extraction and the CLI come last. FID values are comparable only for the same feature
network, preprocessing and N (its bias is ≈ ∝ 1/N). Not implemented: KID, density/coverage, FD∞.
"""
import argparse
import json
import math
import numbers
import warnings
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import encoders
from machinery import inception
from machinery import metrics_fast
from pages.images import find_images, image_batch, iter_images

K_NN = 3                # Kynkäänniemi et al. 2019 (nhood_sizes=[3]); §7 "Kth nearest neighbor"
CHUNK = 1 << 24         # DESIGN: float64 elements per distance chunk of the plain path (128 MiB)
PLAIN_MAX = 1 << 25     # DESIGN: below ~3e7 difference elements the plain pass beats the fast path's overhead
PrecisionRecall = namedtuple("PrecisionRecall", "precision recall")


# ------------------------------------------------------------------------------------- FID (§7, §8.2)
def feature_stats(feats, block_rows=4096):
    """Mean (D,) and unbiased covariance (D, D) = np.cov(x, rowvar=False), float64 numpy arrays,
    summed over row blocks (memory O(block · D + D²); numpy's xᵀx is a symmetric rank-k update,
    2× torch's float64 GEMM on our CPUs). GPU: one float64 GEMM."""
    x = _features(feats, "features")
    n = len(x)
    if x.device.type != "cpu":
        x = x.double()
        xc = x - x.mean(0)                                         # (N, D)
        return x.mean(0).cpu().numpy(), (xc.T @ xc / (n - 1)).cpu().numpy()
    x = x.numpy()
    mu = sum(x[i:i + block_rows].sum(0, dtype=np.float64) for i in range(0, n, block_rows)) / n
    sigma = np.zeros((x.shape[1], x.shape[1]))
    for i in range(0, n, block_rows):
        xc = x[i:i + block_rows].astype(np.float64) - mu           # (b, D)
        sigma += xc.T @ xc
    return mu, sigma / (n - 1)


def fid_from_stats(mu1, sigma1, mu2, sigma2):
    """FID = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr √(Σ₁Σ₂)  (Heusel et al. 2017). Not clamped at 0.

    tr √(Σ₁Σ₂) = Σᵢ √λᵢ(Lᵀ Σ₂ L) for Σ₁ = L Lᵀ: Σ₁Σ₂ = L(LᵀΣ₂) and (LᵀΣ₂)L share their eigenvalues and
    LᵀΣ₂L is symmetric PSD, so eigvalsh applies (no scipy sqrtm, no complex parts). L = Cholesky
    factor, or V·√w from eigh when Σ₁ is singular (N ≤ D)."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise ValueError(f"FID statistics {name}: {a.size - np.isfinite(a).sum()} NaN/inf values")
    try:
        L = np.linalg.cholesky(sigma1)
    except np.linalg.LinAlgError:
        w, V = np.linalg.eigh(sigma1)
        L = V * np.sqrt(np.clip(w, 0, None))
    M = L.T @ sigma2 @ L
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((M + M.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def frechet_distance(real, fake):
    """FID between feature sets real (N, D) and fake (M, D); N ≤ D works but is mostly bias."""
    real, fake = _pair(real, fake, 2)
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


# ---------------------------------------------------------------- precision / recall (§7, plain)
def sq_dists(a, b):
    """(B, D), (C, D) -> (B, C) float64 squared distances Σ(a − b)², from the differences (identical
    points are exactly 0; no ‖a‖² + ‖b‖² − 2a·b cancellation)."""
    return (a.double()[:, None, :] - b.double()[None, :, :]).square().sum(-1)


def knn_radii_sq(x, k=K_NN):
    """r_k(x; X)² for every row of x (N, D): the (k+1)-th smallest squared distance in its row, whose
    smallest is the 0 to itself. -> (N,) float64."""
    step = max(1, CHUNK // (len(x) * x.shape[1]))
    return torch.cat([sq_dists(x[i:i + step], x).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(x), step)])


def precision_recall_plain(real, fake, k=K_NN):
    """Kynkäänniemi et al.'s precision and recall by the definition, memory O(CHUNK + N + M)."""
    r2_real, r2_fake = knn_radii_sq(real, k), knn_radii_sq(fake, k)
    fake_in = torch.zeros(len(fake), dtype=torch.bool, device=fake.device)
    real_in = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    step = max(1, CHUNK // (len(real) * real.shape[1]))
    for i in range(0, len(fake), step):
        d2 = sq_dists(fake[i:i + step], real)                            # (b, N)
        fake_in[i:i + step] = (d2 <= r2_real[None, :]).any(1)           # g inside some real ball
        real_in |= (d2 <= r2_fake[i:i + step, None]).any(0)             # r inside some fake ball
    return PrecisionRecall(fake_in.sum().item() / len(fake), real_in.sum().item() / len(real))


def precision_recall(real, fake, k=K_NN, *, fast=None, device=None, block=None, bf16=None):
    """-> PrecisionRecall(precision, recall) of real (N, D) and fake (M, D) features (numpy or torch).

    fast=True runs metrics_fast (GEMM screening, exact recomputation of what the screen cannot
    decide): the same answer as fast=False (precision_recall_plain), much faster on large sets;
    fast=None (default) picks it unless the plain pass is small (≤ PLAIN_MAX elements). `device`:
    where to compute (default: the fake features'); `block`, `bf16`: metrics_fast's tile size and
    bf16 screen (default: where it is faster). Raises ValueError for k not a positive integer,
    N or M ≤ k, NaN/inf features or differing widths."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    real, fake = _pair(real, fake, k + 1)
    device = torch.device(device) if device else fake.device
    real, fake = _common_scale(real.to(device), fake.to(device))
    n, m, d = len(real), len(fake), real.shape[1]
    if fast or (fast is None and (n * n + m * m + n * m) * d > PLAIN_MAX):
        return PrecisionRecall(*metrics_fast.precision_recall(real, fake, k, block, bf16))
    return precision_recall_plain(real, fake, k)


# ----------------------------------------------------------------------------- K-shot plan (§7, §8.2)
def kshot_select(groups, k, seed=0):
    """The K-shot plan: for each group (class / page) of n test images pick k of them at random
    (seeded) as conditioning images, each giving n // k samples (the first n % k one more), so the
    plan generates exactly N samples. -> [(cond_index, num_samples)], cond_index into `groups`.

    groups: one group id per test image. §7's ungrouped form ("select K of N"): groups = [0] * N;
    §8.2's one-shot ImageNet: groups = class labels, k = 1. k=None: the full-dataset protocol
    (every test image conditions one sample). The seed is part of the plan's definition (which test images
    condition), hence a fixed default: every model compared is evaluated on the same plan."""
    rng, plan = np.random.default_rng(seed), []
    for g, idx in _members(groups).items():
        kg = len(idx) if k is None else k
        if not 1 <= kg <= len(idx):
            raise ValueError(f"group {g!r} has {len(idx)} test images; cannot pick k={k} of them")
        base, extra = divmod(len(idx), kg)
        plan += [(int(c), base + int(j < extra))
                 for j, c in enumerate(np.sort(rng.choice(idx, kg, replace=False)))]
    return plan


def kshot_metrics(real_feats, fake_feats, k_nn=K_NN):
    """FID, precision and recall between the N test images and the N K-shot samples (§7)."""
    if len(real_feats) != len(fake_feats):
        raise ValueError(f"the K-shot protocol compares N test images with N samples; got "
                         f"{len(real_feats)} and {len(fake_feats)}")
    p, r = precision_recall(real_feats, fake_feats, k=k_nn)
    return {"fid": frechet_distance(real_feats, fake_feats), "precision": p, "recall": r,
            "n": len(real_feats), "k_nn": k_nn}


def balanced_subset(groups, per_group, seed=0):
    """Sorted indices of `per_group` random images of every group (§8.2: "ten images randomly
    per-class ... a ground truth set of 10000 images"). The seed defines the subset, hence a fixed default."""
    rng, members = np.random.default_rng(seed), _members(groups)
    small = {g: len(idx) for g, idx in members.items() if len(idx) < per_group}
    if small:
        raise ValueError(f"{len(small)} groups have fewer than {per_group} images, e.g. "
                         f"{dict(list(small.items())[:5])}")
    return np.sort(np.concatenate([rng.choice(idx, per_group, replace=False) for idx in members.values()]))


def alignment(cond_emb, sample_emb, counts=None):
    """§8.2 alignment: mean over samples of cos(sample embedding, ITS conditioning image's embedding).

    cond_emb (K, D); sample_emb (K, S, D), or (N, D) ordered by condition with counts (K,) samples
    per condition (e.g. kshot_select's num_samples; default one each). INTERPRETATION: every sample
    weighs equally."""
    c = _features(cond_emb, "cond_emb", 1).double()
    s = torch.as_tensor(np.asarray(sample_emb)) if not torch.is_tensor(sample_emb) else sample_emb
    if s.ndim == 3:
        counts, s = [s.shape[1]] * s.shape[0], s.reshape(-1, s.shape[-1])
    s = _features(s, "sample_emb", 1).double().to(c.device)
    counts = [1] * len(c) if counts is None else [int(n) for n in counts]
    if len(counts) != len(c) or sum(counts) != len(s):
        raise ValueError(f"{len(c)} conditions with counts summing to {sum(counts)} do not match "
                         f"{len(s)} sample embeddings")
    own = torch.repeat_interleave(c, torch.tensor(counts, device=c.device), dim=0)   # (N, D)
    return torch.nn.functional.cosine_similarity(own, s, dim=1).mean().item()


# ------------------------------------------------------------------------------ input checks
def _features(x, name, min_rows=2):
    """(N, D) numpy array or tensor -> float tensor on its own device; one-line errors for bad input."""
    x = torch.from_numpy(np.ascontiguousarray(x)) if not torch.is_tensor(x) else x.detach()
    if x.ndim != 2:
        raise ValueError(f"{name}: expected features of shape (N, D), got {tuple(x.shape)}")
    if len(x) < min_rows:
        raise ValueError(f"{name}: needs at least {min_rows} samples, got {len(x)}")
    if x.dtype not in (torch.float32, torch.float64):                  # ints, float16, bfloat16
        x = x.float()
    bad = x.numel() - torch.isfinite(x).sum().item()
    if bad:
        raise ValueError(f"{name}: {bad} NaN/inf values in the features")
    return x


def _pair(real, fake, min_rows):
    real, fake = _features(real, "real", min_rows), _features(fake, "fake", min_rows)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: real D={real.shape[1]}, fake D={fake.shape[1]}")
    return real, fake


def _common_scale(real, fake, limit=2.0 ** 50):
    """Both sets × the same power of two (exact, float64) when |values| > 2⁵⁰ or < 2⁻⁵⁰: squared
    distances of finite float32 features (up to ~3e38) would overflow; P/R are scale-invariant."""
    big = max(real.abs().max().item(), fake.abs().max().item())
    if big == 0 or 1 / limit <= big <= limit:
        return real, fake
    s = 2.0 ** -math.floor(math.log2(big))
    return real.double() * s, fake.double() * s


def _members(groups):
    members = {}
    for i, g in enumerate(groups):
        members.setdefault(g.item() if hasattr(g, "item") else g, []).append(i)
    return members


# ------------------------------------------------------------------------------ feature networks
class FeatureNetwork(torch.nn.Module):
    """images in [-1, 1] (B, 3, H, W) -> features (B, D) float32; `.name` says which network.
    `preprocess` maps images of any size to the network's input (applied per image by
    extract_features, so a file's features never depend on the other files)."""

    def __init__(self, name, net, preprocess=None):
        super().__init__()
        self.name, self.net, self.preprocess = name, net, preprocess

    @torch.no_grad()
    def features(self, prepared):
        out = self.net(prepared)
        return (out[0] if isinstance(out, tuple) else out).float()   # encoders return (global, tokens)

    def forward(self, images):
        return self.features(self.preprocess(images) if self.preprocess is not None else images)


def feature_network(name, weights=None, device="cpu", allow_random=False, act=None):
    """"inception": FID's Inception-v3 pool3 (2048-d, inception.py, weights file
    pt_inception-2015-12-05-6726825d.pth). Any encoders.py preset ("dinov2-l14", ...): its global
    embedding after its eval preprocessing (FD-DINOv2 uses dinov2-l14, dgm-eval). Without weights
    the features are random and meaningless: refused unless allow_random (smoke tests). act: the MLP
    activation of a CLIP file that does not record it ("quick_gelu" | "gelu", encoders.load_encoder)."""
    if weights is None and not allow_random:
        hint = (f"{inception.WEIGHTS_FILE} from {inception.WEIGHTS_URL}" if name == "inception"
                else f"the official {name} weights file")
        raise ValueError(f"{name} features need --weights ({hint}); --random-weights runs a random "
                         f"network for smoke tests only (meaningless numbers)")
    src = Path(weights).name if weights else "RANDOM weights"
    if name == "inception":
        net = inception.load_inception(weights) if weights else inception.random_inception(0)
        net = FeatureNetwork(f"inception-v3 pool3 ({src})", net, inception.preprocess)
    else:
        enc = encoders.load_encoder(name, weights, act=act)
        net = FeatureNetwork(f"{name} global embedding ({src})", enc, enc.preprocess)
    return net.to(device).eval()


def extract_features(net, images, batch_size=64, device="cpu", progress=True, max_pixels=None):
    """Features (N, D) float32 numpy of an image folder (images.find_images: recursive, follows links;
    unreadable files skipped with a logged reason), or of images given in Python: one image or batch, or an
    iterable of them, each converted by images.image_batch (PIL of any mode; numpy uint8 HWC, 0..255;
    tensors (3, H, W) / (B, 3, H, W), uint8 in 0..255 or float in [-1, 1]). Every image is brought to the
    network's input size on its own (its `preprocess`), then batched by batch_size. max_pixels:
    images.py's decompression-bomb limit (None = Pillow's setting, 0 = none). Raises ValueError (one line)
    for an empty folder, no readable image, or an input image_batch refuses (e.g. [0, 1] float tensors)."""
    total = None
    if isinstance(images, (str, Path)):
        paths = find_images(images)
        batches, total = (x[None] for x in iter_images(paths, max_pixels=max_pixels)), len(paths)
    else:
        one = isinstance(images, (torch.Tensor, np.ndarray, Image.Image))   # one image or batch, not an iterable
        batches = (image_batch(x) for x in ([images] if one else images))
    prepare = getattr(net, "preprocess", None)
    run = net.features if isinstance(net, FeatureNetwork) else net
    feats, batch = [], []

    def flush():
        out = run(torch.cat(batch))
        feats.append((out[0] if isinstance(out, tuple) else out).float().cpu())
        batch.clear()

    with torch.no_grad(), tqdm(total=total, desc=f"features [{getattr(net, 'name', 'net')}]",
                               unit="img", disable=not progress) as bar:
        for x in (chunk for b in batches for chunk in b.split(batch_size)):
            x = x.to(device)
            x = prepare(x) if prepare is not None else x
            if batch and batch[0].shape[1:] != x.shape[1:]:
                flush()                        # no preprocess and a new size: batch same sizes only
            batch.append(x)
            if sum(len(b) for b in batch) >= batch_size:
                flush()
            bar.update(len(x))
        if batch:
            flush()
    if not feats:
        raise ValueError("no readable images to extract features from")
    return torch.cat(feats).numpy()


# -------------------------------------------------------------------------------------------- CLI
def _positive_int(s):
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1 or str(v) != s.strip():
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}")
    return v


def main(argv=None):
    ap = argparse.ArgumentParser(description="FID and precision/recall between two feature files "
                                 "(.npy, (N, D)) or two image folders.")
    ap.add_argument("real", help="real/test features (.npy) or image folder")
    ap.add_argument("fake", help="generated features (.npy) or image folder")
    ap.add_argument("--k", type=_positive_int, default=K_NN,
                    help="k of the k-NN radius (default 3, Kynkäänniemi et al. 2019)")
    ap.add_argument("--features", default="dinov2-l14",
                    help="network for image folders: inception, or an encoders.py preset (default "
                         "dinov2-l14: FD-DINOv2)")
    ap.add_argument("--weights", help=f"weights file of the feature network (inception: {inception.WEIGHTS_FILE})")
    ap.add_argument("--random-weights", action="store_true",
                    help="allow a feature network without weights (smoke tests; the numbers are meaningless)")
    ap.add_argument("--encoder-act", choices=("quick_gelu", "gelu"),
                    help="MLP activation of a CLIP weights file that does not record it (OpenCLIP visual.* files)")
    ap.add_argument("--batch-size", type=_positive_int, default=64, help="images per network call")
    ap.add_argument("--max-pixels", type=int, default=None,
                    help="decompression-bomb limit per image in pixels (default: Pillow's Image.MAX_IMAGE_PIXELS; 0 = none)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    paths = [Path(args.real), Path(args.fake)]
    for p in paths:
        if not p.exists():
            ap.error(f"{p}: no such file or folder")
    try:
        if all(p.is_dir() for p in paths):
            net = feature_network(args.features, args.weights, args.device, args.random_weights, args.encoder_act)
            real, fake = (extract_features(net, p, args.batch_size, args.device, max_pixels=args.max_pixels) for p in paths)
            source = net.name
        elif all(p.suffix == ".npy" for p in paths):
            real, fake = (np.load(p) for p in paths)
            source = "precomputed (.npy)"
        else:
            ap.error(f"give two .npy feature files or two image folders, not {args.real} and {args.fake}")
        out = {"fid": frechet_distance(real, fake)}
        out.update(precision_recall(real=real, fake=fake, k=args.k)._asdict())
    except (ValueError, FileNotFoundError, KeyError) as e:
        ap.error(str(e).strip("'\""))
    out.update(k=args.k, n_real=len(real), n_fake=len(fake), features=source)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    from machinery import flags
    flags.survive_lost_output()  # `| head`, a killed `| tee`: the command goes on
    main()
