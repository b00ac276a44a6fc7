"""metrics.py: the paper's statements about FID, precision/recall and the K-shot protocol (§7, §8.2)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

import data
from machinery import inception
import metrics
from machinery import metrics_fast

ROOT = Path(__file__).resolve().parent.parent


def gaussian(n, d, seed, scale=1.0, shift=0.0):
    return np.random.default_rng(seed).standard_normal((n, d)) * scale + shift


def classes(num_classes, per_class, d, seed, noise=1.0):
    """Class-structured features: class means ~ N(0, 4I), members = mean + N(0, noise² I)."""
    rng = np.random.default_rng(seed)
    means = 2 * rng.standard_normal((num_classes, d))
    labels = np.repeat(np.arange(num_classes), per_class)
    return means[labels] + noise * rng.standard_normal((len(labels), d)), labels, means


def pytorch_fid_formula(mu1, sigma1, mu2, sigma2):
    """pytorch-fid 0.3.0 calculate_frechet_distance: the standard, sqrtm-based formula."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = covmean.real
    diff = mu1 - mu2
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def brute_force_pr(real, fake, k):
    """Kynkäänniemi et al. 2019 by the definition, written independently of metrics.py: numpy
    float64, one point at a time, squared distances from the differences, radius = (k+1)-th smallest
    in the point's own set (itself included at 0), membership with <=."""
    real, fake = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)

    def sq_dists(a, b):                                          # (len(a), len(b))
        return np.stack([((b - x) ** 2).sum(1) for x in a])

    r2_real = np.sort(sq_dists(real, real), axis=1)[:, k]
    r2_fake = np.sort(sq_dists(fake, fake), axis=1)[:, k]
    d2 = sq_dists(fake, real)                                    # (M, N)
    return float((d2 <= r2_real[None, :]).any(1).mean()), float((d2 <= r2_fake[:, None]).any(0).mean())


# --------------------------------------------------------------------------------------------- FID
def test_fid_of_a_set_with_itself_is_zero():
    x = gaussian(3000, 64, 0, shift=3.0)
    assert abs(metrics.frechet_distance(x, x)) < 1e-8


def test_fid_equals_pytorch_fid_formula():
    real, fake = gaussian(3000, 64, 1), gaussian(3000, 64, 2, scale=1.1, shift=0.05)
    ours = metrics.frechet_distance(real, fake)
    ref = pytorch_fid_formula(*metrics.feature_stats(real), *metrics.feature_stats(fake))
    assert ours == pytest.approx(ref, rel=1e-6)


def test_fid_singular_covariance_is_finite_and_matches_sqrtm():
    """N ≤ D (one-shot copies have rank-deficient Σ): the eigh fallback, no complex parts."""
    real, fake = gaussian(40, 64, 3), gaussian(40, 64, 4, shift=0.5)
    with pytest.warns(UserWarning, match="singular covariance"):
        ours = metrics.frechet_distance(real, fake)
    ref = pytorch_fid_formula(*metrics.feature_stats(real), *metrics.feature_stats(fake))
    assert np.isfinite(ours) and isinstance(ours, float)
    assert ours == pytest.approx(ref, rel=1e-6)


def exact_gaussian_sample(n, mu, sigma, seed):
    """n points whose sample mean and unbiased covariance are exactly mu and sigma."""
    z = gaussian(n, len(mu), seed)
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T   # sample cov = I
    return mu + z @ np.linalg.cholesky(sigma).T


def test_fid_of_two_gaussians_equals_closed_form():
    """FID(N(μ₁, diag a), N(μ₂, diag b)) = ‖μ₁ − μ₂‖² + Σ (√a − √b)² (the covariances commute)."""
    d = 16
    rng = np.random.default_rng(5)
    mu1, mu2, a, b = rng.normal(size=d), rng.normal(size=d), rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.fid_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-10)
    real = exact_gaussian_sample(500, mu1, np.diag(a), 6)
    fake = exact_gaussian_sample(700, mu2, np.diag(b), 7)
    assert metrics.frechet_distance(real, fake) == pytest.approx(closed, rel=1e-8)


def test_fid_is_symmetric_and_accepts_torch():
    real, fake = gaussian(1000, 32, 8), gaussian(1500, 32, 9, scale=0.8)
    assert metrics.frechet_distance(real, fake) == pytest.approx(metrics.frechet_distance(fake, real), rel=1e-9)
    assert metrics.frechet_distance(torch.tensor(real, dtype=torch.float32), fake) == pytest.approx(
        metrics.frechet_distance(real.astype(np.float32), fake), rel=1e-12)


def test_stats_round_trip_and_match_np_cov(tmp_path):
    x = gaussian(1000, 24, 10, shift=2.0).astype(np.float32)
    mu, sigma = metrics.feature_stats(x)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    assert mu.dtype == sigma.dtype == np.float64
    metrics.save_stats(tmp_path / "ref.npz", mu, sigma)
    mu2, sigma2 = metrics.load_stats(tmp_path / "ref.npz")
    y = gaussian(800, 24, 11)
    assert metrics.fid_from_stats(mu2, sigma2, *metrics.feature_stats(y)) == metrics.frechet_distance(x, y)


# ------------------------------------------------------------------------------ precision / recall
def test_identical_sets_have_precision_and_recall_one():
    x = gaussian(300, 16, 12)
    x[1] = x[0]                                                  # duplicates inside the set too
    assert metrics.precision_recall(x, x) == (1.0, 1.0)


def test_section7_toy_one_image_copied_ten_times():
    """§7: ten real images; the model copies one of them ten times -> precision 1, recall 0.1.

    Also the argument-order check (torch-fidelity #58): swapping real and fake would give (0.1, 1)."""
    real = gaussian(10, 2048, 13)
    fake = np.repeat(real[3:4], 10, axis=0)
    assert metrics.precision_recall(real, fake) == (1.0, 0.1)
    assert metrics.precision_recall(fake=fake, real=real) == metrics.precision_recall(real, fake)
    assert metrics.precision_recall(fake, real) == (0.1, 1.0)


def test_copying_model_full_recall_one_but_one_shot_recall_collapses():
    """§7, Fig. 3: a copy model is perfect on the full-dataset protocol; one-shot exposes it."""
    real, labels, means = classes(100, 10, 32, 14)
    full = metrics.kshot_select(labels, None)                    # every test image conditions 1 sample
    full_copy = np.repeat(real[[c for c, _ in full]], [n for _, n in full], axis=0)
    assert metrics.precision_recall(real, full_copy) == (1.0, 1.0)
    one = metrics.kshot_select(labels, 1, seed=0)                # one conditioning image per class
    one_copy = np.repeat(real[[c for c, _ in one]], [n for _, n in one], axis=0)
    p, r = metrics.precision_recall(real, one_copy)
    assert len(one_copy) == len(real) and (p, r) == (1.0, 0.1)
    # copies up to float32 rounding (1e-4 jitter at D = 2048) still give the exact-arithmetic answer
    wide, wide_labels, _ = classes(100, 10, 2048, 16)
    plan = metrics.kshot_select(wide_labels, 1)
    jittered = np.repeat(wide[[c for c, _ in plan]], 10, axis=0) + 1e-4 * gaussian(1000, 2048, 17)
    assert metrics.precision_recall(wide, jittered) == (1.0, 0.1)
    # a model that varies within the class (fresh members of the class) keeps a high one-shot recall
    varied = means[labels] + gaussian(len(real), 32, 15)
    assert metrics.precision_recall(real, varied).recall > 0.5 > r


def test_dropping_modes_lowers_recall_keeps_precision():
    real, labels, means = classes(20, 50, 16, 15)
    fake = means[labels] + gaussian(len(real), 16, 16)           # fresh samples of every class
    half = fake[labels < 10]                                      # a model that lost 10 of 20 classes
    half = np.concatenate([half, half + 0.01 * gaussian(len(half), 16, 17)])
    p_all, r_all = metrics.precision_recall(real, fake)
    p_half, r_half = metrics.precision_recall(real, half)
    assert r_half < r_all - 0.3
    assert p_half >= p_all - 0.05


def pr_cases():
    """Random and adversarial inputs: a loose screen bound, a global tolerance, a wrong radius index
    or a strict < would each change at least one of these answers."""
    real, labels, means = classes(40, 10, 64, 30)
    copies = np.repeat(real[::10], 10, axis=0)                                  # one-shot copy model
    cluster = 1e-3 * gaussian(400, 64, 39)
    lattice = np.random.default_rng(40).integers(0, 3, (300, 6)).astype(np.float64)   # exact ties
    sphere = gaussian(120, 17, 41)
    sphere[:, 16] = 0                                       # 120 unit vectors in 16-d, and their centre:
    sphere = np.concatenate([np.zeros((1, 17)), sphere / np.linalg.norm(sphere, axis=1, keepdims=True)])
    axis = np.zeros((6, 17))                                # the centre's radius ≈ 1 (120 near-ties) alone
    axis[:, 16] = [1 - 1e-6, 1 + 1e-6, -(1 - 1e-6), -(1 + 1e-6), 1 - 2e-6, -(1 + 2e-6)]   # decides P
    return {
        "gaussian": (gaussian(400, 64, 31), gaussian(400, 64, 32)),            # P, R far from 0 and 1
        "offset 1e3": (gaussian(400, 64, 33, shift=1e3), gaussian(400, 64, 34, shift=1e3)),
        "far offset 1e6, fake shifted": (gaussian(300, 32, 42, shift=1e6), gaussian(300, 32, 43, shift=1e6 + 0.3)),
        "copies": (real, copies),
        "jittered copies": (real, copies + 1e-4 * gaussian(len(copies), 64, 35)),
        "same set": (real, real.copy()),
        "duplicates in both sets": (np.repeat(real[:100], 3, axis=0), np.repeat(real[50:150], 2, axis=0)),
        "heavy tails": (gaussian(400, 64, 36) ** 3, gaussian(400, 64, 37) ** 3),
        "class means": (real, means[labels] + 0.9 * gaussian(len(real), 64, 38)),
        "outlier + shifted cluster": (np.concatenate([cluster, np.full((1, 64), 100.0)]), cluster + 0.05),
        "lattice ties": (lattice, np.random.default_rng(44).integers(0, 3, (250, 6)).astype(np.float64)),
        "centre of a sphere (many equal distances)": (sphere, axis),
        "float32 input": (gaussian(300, 48, 45).astype(np.float32), gaussian(250, 48, 46, 1.2, 0.1).astype(np.float32)),
    }


@pytest.mark.parametrize("case", list(pr_cases()))
def test_precision_recall_plain_and_fast_equal_brute_force(case):
    """§7 precision/recall: plain definition == fast path (float32 and bf16 screens, small tiles so
    tile edges fall everywhere) == the independent float64 brute force."""
    real, fake = pr_cases()[case]
    want = brute_force_pr(real, fake, 3)
    assert metrics.precision_recall(real, fake, fast=False) == want
    assert metrics.precision_recall(real, fake, fast=True) == want
    assert metrics.precision_recall(real, fake, fast=True, block=37, bf16=False) == want
    assert metrics.precision_recall(real, fake, fast=True, block=64, bf16=True) == want


@pytest.mark.parametrize("seed", range(16))
def test_fast_equals_plain_on_random_mixtures(seed):
    """Random sizes, widths, scales, offsets, k, tiles and screens; fakes mix exact copies of reals,
    copies with jitter near float32 rounding, duplicates and fresh points."""
    rng = np.random.default_rng(100 + seed)
    n, m = rng.integers(6, 90, 2)
    d = int(rng.choice([1, 2, 3, 8, 33, 130]))
    scale, shift = 10.0 ** rng.uniform(-4, 4), rng.uniform(-1e3, 1e3) * rng.integers(0, 2)
    real = rng.standard_normal((n, d)) * scale + shift
    src = real[rng.integers(0, n, m)]
    kind = rng.integers(0, 4, m)[:, None]
    fake = np.where(kind == 0, src, np.where(kind == 1, src * (1 + 1e-7 * rng.standard_normal((m, d))),
                    rng.standard_normal((m, d)) * scale * rng.uniform(0.5, 2) + shift))
    fake[kind[:, 0] == 3] = fake[0]                                      # duplicates of one point
    k = int(rng.integers(1, min(n, m)))
    want = brute_force_pr(real, fake, k)
    assert metrics.precision_recall(real, fake, k, fast=False) == want
    block, bf16 = int(rng.integers(3, 70)), bool(rng.integers(0, 2))
    assert metrics.precision_recall(real, fake, k, fast=True, block=block, bf16=bf16) == want, (block, bf16)


def test_one_far_point_does_not_change_recall():
    """A tolerance taken from the largest norm (the old global floor) made the shifted
    cluster's reals count as inside (recall 0.9975); brute force says 0.0."""
    cluster = 1e-3 * gaussian(400, 64, 50)
    real, fake = np.concatenate([cluster, np.full((1, 64), 100.0)]), cluster + 0.05
    assert brute_force_pr(real, fake, 3)[1] == 0.0
    assert metrics.precision_recall(real, fake, fast=False).recall == 0.0
    assert metrics.precision_recall(real, fake, fast=True).recall == 0.0
    assert metrics.precision_recall(real, fake, fast=True, bf16=True).recall == 0.0


def test_exact_duplicates_are_inside():
    """Identical features give distance exactly 0 <= radius 0 (§7: a copy is always inside)."""
    assert metrics.precision_recall(np.ones((1024, 4096)), np.ones((1024, 4096))) == (1.0, 1.0)
    assert metrics.precision_recall(np.ones((64, 512)), np.ones((64, 512)), fast=False) == (1.0, 1.0)


def test_huge_finite_features_are_computed_not_overflowed():
    """Float32 features ~1e20 (squared distances overflow float32) must give the float64
    answer. Reals: a tight cluster; fakes: a sparse ring far around it -> P = 0, R = 1."""
    cluster = 0.01 * gaussian(200, 16, 51)
    ring = gaussian(60, 16, 52)
    ring = 10 * ring / np.linalg.norm(ring, axis=1, keepdims=True)
    real, fake = (1e20 * cluster).astype(np.float32), (1e20 * ring).astype(np.float32)
    assert np.isfinite(fake).all() and float(np.abs(fake).max()) ** 2 > float(np.finfo(np.float32).max)
    assert brute_force_pr(real, fake, 3) == (0.0, 1.0)
    assert metrics.precision_recall(real, fake, fast=True) == (0.0, 1.0)
    assert metrics.precision_recall(real, fake, fast=False) == (0.0, 1.0)
    tiny = (real.astype(np.float64) * 1e-250, fake.astype(np.float64) * 1e-250)   # the other end
    assert metrics.precision_recall(*tiny, fast=True) == (0.0, 1.0)


@pytest.mark.parametrize("k", [0, -1, 2.5, True, "3", None])
def test_k_must_be_a_positive_integer(k):
    x = gaussian(20, 4, 53)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        metrics.precision_recall(x, x, k=k)


def test_k_numpy_int_and_k_too_large():
    real, fake = gaussian(30, 4, 54), gaussian(30, 4, 55)
    assert metrics.precision_recall(real, fake, k=np.int64(5)) == brute_force_pr(real, fake, 5)
    assert metrics.precision_recall(real, fake, k=1) == brute_force_pr(real, fake, 1)
    with pytest.raises(ValueError, match="real: needs at least 31 samples"):
        metrics.precision_recall(real, fake, k=30)


def test_fast_path_fallbacks(monkeypatch):
    """Force every exact fallback of metrics_fast: undecided pairs resolved after every tile, exact
    radii recomputed for the near-ties; the answer stays the brute-force one."""
    monkeypatch.setattr(metrics_fast, "MAX_PENDING", 0)
    for case in ("centre of a sphere (many equal distances)", "lattice ties", "copies", "gaussian"):
        real, fake = pr_cases()[case]
        assert metrics.precision_recall(real, fake, fast=True, block=50) == brute_force_pr(real, fake, 3), case


def test_fast_path_ignores_reduced_precision_float32_matmuls():
    """torch.set_float32_matmul_precision("medium") lets float32 GEMMs run in bf16/TF32 (oneDNN, cuBLAS),
    outside the float32 bound: the fast path computes in full float32 anyway and restores the setting
    (and the thread count: it runs all but its GEMMs on one thread)."""
    previous, threads = torch.get_float32_matmul_precision(), torch.get_num_threads()
    torch.set_float32_matmul_precision("medium")
    backends = torch.backends.mkldnn.matmul, torch.backends.cuda.matmul
    user = [b.fp32_precision for b in backends]
    try:
        for case in ("centre of a sphere (many equal distances)", "jittered copies", "class means"):
            real, fake = pr_cases()[case]
            assert metrics.precision_recall(real, fake, fast=True, bf16=False) == brute_force_pr(real, fake, 3), case
            assert [b.fp32_precision for b in backends] == user != ["ieee", "ieee"]
            assert torch.get_num_threads() == threads
    finally:
        torch.set_float32_matmul_precision(previous)


@pytest.mark.parametrize("shift, power, lowp", [(0.0, 1, False), (0.0, 1, True), (0.0, 3, True), (30.0, 1, True)])
def test_tile_error_bound_holds_per_pair(shift, power, lowp):
    """|screened squared distance − exact| <= the per-pair bound metrics_fast decides with."""
    x = torch.tensor(gaussian(256, 512, 56, shift=shift) ** power, dtype=torch.float32)
    y = torch.tensor(gaussian(192, 512, 57, shift=shift) ** power, dtype=torch.float32)
    ox, oy = (metrics_fast.operands(t, torch.zeros(512, dtype=torch.float64), 1.0, lowp) for t in (x, y))
    lo, absg = metrics_fast.lower(ox, slice(None), oy, slice(None), metrics_fast.workspace(ox, 256, 1))
    i, j = torch.meshgrid(torch.arange(256), torch.arange(192), indexing="ij")
    lo, hi = lo.double(), (lo + 2 * metrics_fast.err(absg, ox, i, oy, j)).double()   # as the fast path forms them
    d2, err = (lo + hi) / 2, (hi - lo) / 2                       # the interval's centre and half-width
    exact = torch.cdist(x.double(), y.double(), compute_mode="donot_use_mm_for_euclid_dist").square()
    assert ((d2.double() - exact).abs() <= err.double()).all()
    if not shift and power == 1:                  # centred data: tight enough to decide most pairs
        assert (err.double() < 0.05 * exact).float().mean() > 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    real, fake = gaussian(2000, 64, 20), gaussian(2000, 64, 21, scale=1.1)
    cpu = metrics.precision_recall(real, fake)
    assert cpu == brute_force_pr(real, fake, 3)
    assert metrics.precision_recall(torch.tensor(real).cuda(), torch.tensor(fake).cuda()) == cpu
    assert metrics.frechet_distance(torch.tensor(real).cuda(), fake) == pytest.approx(
        metrics.frechet_distance(real, fake), rel=1e-9)


# ------------------------------------------------------------------------------ K-shot + alignment
def test_kshot_plan_bookkeeping():
    labels = np.array([7] * 10 + [3] * 10 + [5] * 4)
    plan = metrics.kshot_select(labels, 3, seed=1)
    assert sum(n for _, n in plan) == len(labels)
    for g in (7, 3, 5):
        mine = [(c, n) for c, n in plan if labels[c] == g]
        assert len(mine) == 3 and sum(n for _, n in mine) == (labels == g).sum()
    assert sorted(n for c, n in plan if labels[c] == 7) == [3, 3, 4]
    assert plan == metrics.kshot_select(list(labels), 3, seed=1)   # seeded, lists work too
    assert plan != metrics.kshot_select(labels, 3, seed=2)
    assert metrics.kshot_select(labels, None) == [(i, 1) for i in range(len(labels))]
    with pytest.raises(ValueError, match="group 5 has 4 test images"):
        metrics.kshot_select(labels, 5)
    subset = metrics.balanced_subset(labels, 4, seed=0)
    assert len(subset) == 12 and np.all(np.bincount(labels[subset])[[3, 5, 7]] == 4)


def test_kshot_plan_is_the_section7_protocol():
    """§7 / §8.2: of N test images in groups, K distinct conditioning images per group, N/K samples
    each, N in all; a uniform random choice (every image is picked about K/n of the time)."""
    n_groups, per_group, k = 50, 10, 2
    labels = np.repeat(np.arange(n_groups), per_group)
    picked = np.zeros(len(labels))
    for seed in range(200):
        plan = metrics.kshot_select(labels, k, seed=seed)
        conds = [c for c, _ in plan]
        assert len(plan) == n_groups * k and len(set(conds)) == len(conds)
        assert all(n == per_group // k for _, n in plan)                   # N/K samples each
        assert np.all(np.bincount(labels[conds], minlength=n_groups) == k)
        picked[conds] += 1
    assert abs(picked.mean() / 200 - k / per_group) < 1e-12
    assert 0.1 < picked.min() / 200 and picked.max() / 200 < 0.35          # k / n = 0.2, 2000 draws
    one_shot = metrics.kshot_select([0] * 12, 1, seed=3)                   # §7's ungrouped form
    assert len(one_shot) == 1 and one_shot[0][1] == 12


def test_kshot_metrics_reports_all_three():
    real, labels, _ = classes(20, 10, 8, 22)
    plan = metrics.kshot_select(labels, 1)
    fake = np.repeat(real[[c for c, _ in plan]], [n for _, n in plan], axis=0)
    out = metrics.kshot_metrics(real, fake)
    assert (out["precision"], out["recall"]) == (1.0, 0.1)
    mu_r, mu_f = real.mean(0), fake.mean(0)                     # FID by the formula, independently
    assert out["fid"] == pytest.approx(pytorch_fid_formula(mu_r, np.cov(real, rowvar=False),
                                                           mu_f, np.cov(fake, rowvar=False)), rel=1e-6)
    with pytest.raises(ValueError, match="N test images with N samples"):
        metrics.kshot_metrics(real, fake[:-1])


def test_alignment_is_mean_cosine_to_own_condition():
    cond = np.eye(3, 5)
    samples = np.stack([cond, -cond, cond], axis=1)              # (K=3, S=3, D): cos 1, -1, 1
    assert metrics.alignment(cond, samples) == pytest.approx(1 / 3)
    flat = np.concatenate([2 * cond[:1], cond[1:2], cond[1:2], np.eye(5)[3:4]])   # counts 1, 2, 1
    assert metrics.alignment(cond, flat, counts=[1, 2, 1]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="do not match"):
        metrics.alignment(cond, flat, counts=[1, 1, 1])


def test_alignment_pairs_each_sample_with_its_own_condition():
    """§8.2: every sample is compared with ITS conditioning image. Hand-built: samples of condition
    i point along condition i, except the second sample of condition 1 (cos 0.6): mean (1+1+0.6)/3.
    Pairing them with any other condition (a shifted or reversed pairing), or with the mean
    condition, gives another value."""
    cond = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    samples = np.array([[2.0, 0, 0], [0, 3.0, 0], [0, 0.6, 0.8]])     # counts: cond 0 -> 1, cond 1 -> 2
    own = metrics.alignment(cond, samples, counts=[1, 2])
    assert own == pytest.approx((1 + 1 + 0.6) / 3, abs=1e-12)
    assert metrics.alignment(cond[::-1], samples, counts=[1, 2]) != pytest.approx(own)
    assert metrics.alignment(cond, samples, counts=[2, 1]) != pytest.approx(own)
    hand = np.mean([c @ s / np.linalg.norm(c) / np.linalg.norm(s)
                    for c, s in zip(cond[[0, 1, 1]], samples)])
    assert own == pytest.approx(hand, abs=1e-12)


# -------------------------------------------------------------------------------- errors and CLI
@pytest.mark.parametrize("fn", [metrics.frechet_distance, metrics.precision_recall])
def test_bad_input_gives_clear_errors(fn):
    x = gaussian(20, 8, 23)
    with pytest.raises(ValueError, match="dimensions differ: real D=8, fake D=9"):
        fn(x, gaussian(20, 9, 24))
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="fake: 1 NaN/inf"):
        fn(x, bad)
    with pytest.raises(ValueError, match="real: needs at least"):
        fn(x[:1], x)
    with pytest.raises(ValueError, match=r"shape \(N, D\)"):
        fn(x[0], x)


def test_cli_on_feature_files(tmp_path, capsys):
    real, fake = gaussian(200, 16, 25), gaussian(200, 16, 26, shift=0.2)
    np.save(tmp_path / "real.npy", real), np.save(tmp_path / "fake.npy", fake)
    metrics.main([str(tmp_path / "real.npy"), str(tmp_path / "fake.npy"), "--k", "5"])
    out = json.loads(capsys.readouterr().out)
    assert out["fid"] == pytest.approx(metrics.frechet_distance(real, fake))
    assert (out["precision"], out["recall"]) == metrics.precision_recall(real, fake, k=5)
    assert out["k"] == 5 and out["features"] == "precomputed (.npy)"
    np.save(tmp_path / "wide.npy", gaussian(200, 17, 27))
    with pytest.raises(SystemExit):
        metrics.main([str(tmp_path / "real.npy"), str(tmp_path / "wide.npy")])
    assert "dimensions differ" in capsys.readouterr().err


def test_fid_from_stats_refuses_nan_and_inf():
    mu, sigma = np.zeros(4), np.eye(4)
    for bad in ("mu", "sigma"):
        m2, s2 = mu.copy(), sigma.copy()
        (m2 if bad == "mu" else s2)[1] = np.nan if bad == "mu" else np.inf
        with pytest.raises(ValueError, match=f"{bad}2: .* NaN/inf"):
            metrics.fid_from_stats(mu, sigma, m2, s2)


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "metrics.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def assert_usage_error(res, needle):
    """argparse-style: exit 2, the message on one line of stderr, no traceback."""
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and needle in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("metrics.py: error:")


def write_folder(folder, seed, n, size=(40, 48)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_cli_user_errors_are_one_liners(tmp_path):
    """Bad k, empty folder, random weights without the flag, missing
    Inception weights -> one-line argparse errors (exit 2), nothing computed."""
    np.save(tmp_path / "real.npy", gaussian(20, 4, 60)), np.save(tmp_path / "fake.npy", gaussian(20, 4, 61))
    assert_usage_error(run_cli(tmp_path / "real.npy", tmp_path / "fake.npy", "--k", "0"), "positive integer")
    (tmp_path / "empty").mkdir()
    write_folder(tmp_path / "full", 0, 3)
    assert_usage_error(run_cli(tmp_path / "empty", tmp_path / "full", "--features", "tiny", "--random-weights"),
                       "no images")
    assert_usage_error(run_cli(tmp_path / "full", tmp_path / "full", "--features", "tiny"), "--random-weights")
    res = run_cli(tmp_path / "full", tmp_path / "full", "--features", "inception", "--weights", tmp_path / "nope.pth")
    assert_usage_error(res, inception.WEIGHTS_URL)


def test_api_refuses_random_feature_networks():
    for name in ("inception", "tiny"):
        with pytest.raises(ValueError, match="--random-weights"):
            metrics.feature_network(name)
    assert metrics.feature_network("tiny", allow_random=True).name == "tiny global embedding (RANDOM weights)"


def test_cli_k_flag(tmp_path, capsys):
    real, fake = gaussian(30, 4, 62), gaussian(30, 4, 63)
    np.save(tmp_path / "real.npy", real), np.save(tmp_path / "fake.npy", fake)
    for bad in ("0", "-1", "2.5", "x"):
        with pytest.raises(SystemExit) as e:
            metrics.main([str(tmp_path / "real.npy"), str(tmp_path / "fake.npy"), "--k", bad])
        assert e.value.code == 2 and "positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        metrics.main([str(tmp_path / "real.npy"), str(tmp_path / "fake.npy"), "--k", "30"])
    assert "needs at least 31 samples" in capsys.readouterr().err


def test_folder_features_do_not_depend_on_the_other_files(tmp_path):
    """Each image reaches the network on its own; a 16x16 thumbnail that sorts first
    (it used to set every image's size) changes no other file's features."""
    net = metrics.feature_network("tiny", allow_random=True)
    write_folder(tmp_path / "a", 0, 4, size=(40, 56))
    before = metrics.extract_features(net, tmp_path / "a", batch_size=3, progress=False)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a" / "+thumb.png")
    assert data.find_images(tmp_path / "a")[0].name == "+thumb.png"            # it sorts first
    after = metrics.extract_features(net, tmp_path / "a", batch_size=3, progress=False)
    assert len(after) == 5
    np.testing.assert_allclose(after[1:], before, rtol=0, atol=1e-5)
    single = metrics.extract_features(net, [data.load_image(tmp_path / "a" / "2.png")], progress=False)
    np.testing.assert_allclose(single[0], before[2], rtol=0, atol=1e-5)


def test_folder_walk_follows_symlinks(tmp_path):
    """One walk for the project (data.find_images): a symlinked sub-folder counts."""
    write_folder(tmp_path / "a", 0, 1)
    write_folder(tmp_path / "elsewhere", 1, 5)
    (tmp_path / "a" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    net = metrics.feature_network("tiny", allow_random=True)
    assert len(metrics.extract_features(net, tmp_path / "a", progress=False)) == 6


@pytest.mark.filterwarnings("ignore:FID with")
@pytest.mark.parametrize("network", ["tiny", pytest.param("inception", marks=pytest.mark.slow)])
def test_cli_on_image_folders(tmp_path, capsys, network):
    """Folder → features → metrics, naming the network; inception with a random file in the FID layout."""
    write_folder(tmp_path / "a", 0, 6), write_folder(tmp_path / "b", 1, 6)
    (tmp_path / "a" / "broken.png").write_bytes(b"not an image")   # skipped with a logged reason
    flags = ["--features", network, "--k", "2", "--device", "cpu"]
    if network == "inception":
        torch.save(inception.random_state_dict(0), tmp_path / "pt_inception.pth")
        flags += ["--weights", str(tmp_path / "pt_inception.pth")]
    else:
        flags += ["--random-weights"]
    metrics.main([str(tmp_path / "a"), str(tmp_path / "b")] + flags)
    out = json.loads(capsys.readouterr().out)
    assert out["n_real"] == out["n_fake"] == 6 and np.isfinite(out["fid"])
    assert out["features"].startswith("inception-v3 pool3" if network == "inception" else "tiny")


def test_extract_features_converts_each_image_kind():
    """uint8 tensors (once all-NaN: the encoder's mean/std took the uint8 dtype), numpy uint8 HWC and PIL images
    give the features of the hand-converted [-1, 1] tensor x / 127.5 - 1; a (B, 3, H, W) tensor is batched by
    batch_size; [0, 1] floats are refused in one line."""
    net = metrics.feature_network("tiny", allow_random=True)
    pixels = np.random.default_rng(3).integers(0, 256, (4, 40, 56, 3), dtype=np.uint8)
    hand = torch.from_numpy(pixels.astype(np.float64) / 127.5 - 1).permute(0, 3, 1, 2).float()
    want = np.concatenate([net(x[None]).numpy() for x in hand])               # each image alone, float32
    u8 = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    calls = []
    net.net.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    for given in (u8, list(u8), pixels, list(pixels), [Image.fromarray(p) for p in pixels], hand):
        calls.clear()
        got = metrics.extract_features(net, given, batch_size=3, progress=False)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        assert max(calls) <= 3
    with pytest.raises(ValueError, match="no value below 0") as e:
        metrics.extract_features(net, hand / 2 + 0.5, progress=False)
    assert "\n" not in str(e.value)
