"""metrics.py: the paper's statements about FID, precision/recall and the K-shot protocol (§7, §8.2)."""
import json

import numpy as np
import pytest
import scipy.linalg
import torch

import metrics


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
    """Float64, full matrices, torch-fidelity's convention (kthvalue(k+1), <=)."""
    real, fake = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)
    r_real = torch.cdist(real, real).kthvalue(k + 1, dim=1).values
    r_fake = torch.cdist(fake, fake).kthvalue(k + 1, dim=1).values
    d = torch.cdist(fake, real)                                   # (M, N)
    precision = (d <= r_real[None, :]).any(1).double().mean().item()
    recall = (d <= r_fake[:, None]).any(0).double().mean().item()
    return precision, recall


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
    assert metrics.precision_recall(wide, jittered) == brute_force_pr(wide, jittered, 3) == (1.0, 0.1)
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


@pytest.mark.parametrize("screen", [False, True])
@pytest.mark.parametrize("block", [37, 64, 250, metrics.BLOCK])
def test_tiled_equals_full_matrix_float64(block, screen):
    real, fake = gaussian(300, 48, 18), gaussian(250, 48, 19, scale=1.2, shift=0.1)
    ours = metrics.precision_recall(real, fake, k=3, block=block, screen=screen)
    assert ours == pytest.approx(brute_force_pr(real, fake, 3), abs=0)


def screen_cases():
    """Data on which a loose or wrong bf16 error bound would flip decisions."""
    real, labels, means = classes(40, 10, 64, 30)
    copies = np.repeat(real[::10], 10, axis=0)                                  # one-shot copy model
    return {
        "gaussian": (gaussian(400, 64, 31), gaussian(400, 64, 32)),            # P, R far from 0 and 1
        "offset 1e3": (gaussian(400, 64, 33, shift=1e3), gaussian(400, 64, 34, shift=1e3)),
        "copies": (real, copies),
        "jittered copies": (real, copies + 1e-4 * gaussian(len(copies), 64, 35)),
        "same set": (real, real.copy()),
        "heavy tails": (gaussian(400, 64, 36) ** 3, gaussian(400, 64, 37) ** 3),
        "class means": (real, means[labels] + 0.9 * gaussian(len(real), 64, 38)),
    }


@pytest.mark.parametrize("case", list(screen_cases()))
def test_bf16_screen_gives_the_float32_answer(case):
    """The screen changes the work, never the result: equal to the float32 path and to float64."""
    real, fake = screen_cases()[case]
    exact = metrics.precision_recall(real, fake, block=96, screen=False)
    assert metrics.precision_recall(real, fake, block=96, screen=True) == exact
    assert exact == brute_force_pr(real, fake, 3)


def test_bf16_screen_fallback_to_float32_rows(monkeypatch):
    """With every pair undecided (identical points; or MAX_OPEN = 0) the rows are redone in float32."""
    same = np.ones((50, 8))
    assert metrics.precision_recall(same, same, block=16, screen=True) == (1.0, 1.0)
    monkeypatch.setattr(metrics, "MAX_OPEN", 0)
    real, fake = screen_cases()["gaussian"]
    assert metrics.precision_recall(real, fake, block=96, screen=True) == brute_force_pr(real, fake, 3)


@pytest.mark.parametrize("shift, power", [(0.0, 1), (30.0, 1), (0.0, 3)])
def test_bf16_tile_error_bound_holds(shift, power):
    """|bf16 tile − exact squared distance| ≤ the returned bound, uncentred inputs included."""
    x = torch.tensor(gaussian(256, 512, 40, shift=shift) ** power, dtype=torch.float32)
    y = torch.tensor(gaussian(192, 512, 41, shift=shift) ** power, dtype=torch.float32)
    p, q = (metrics._screen(t, t.square().sum(1), metrics._bf16_norms(t, 64), slice(None)) for t in (x, y))
    d2, err = metrics._screened_sq_dists(p, q)
    exact = torch.cdist(x.double(), y.double()).square()
    assert (d2.double() - exact).abs().max().item() <= err
    if not shift:                    # precision_recall centres the data: then the bound is tight enough
        assert err < 0.05 * exact.mean().item()                  # to decide most pairs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    real, fake = gaussian(2000, 64, 20), gaussian(2000, 64, 21, scale=1.1)
    cpu = metrics.precision_recall(real, fake)
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


def test_kshot_metrics_reports_all_three():
    real, labels, _ = classes(20, 10, 8, 22)
    plan = metrics.kshot_select(labels, 1)
    fake = np.repeat(real[[c for c, _ in plan]], [n for _, n in plan], axis=0)
    out = metrics.kshot_metrics(real, fake)
    assert (out["precision"], out["recall"]) == (1.0, 0.1) and out["fid"] > 0
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


def write_folder(folder, seed, n):
    from PIL import Image
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")        # skipped with a logged reason


@pytest.mark.filterwarnings("ignore:FID with")
@pytest.mark.parametrize("network", ["tiny", pytest.param("inception", marks=pytest.mark.slow)])
def test_cli_on_image_folders(tmp_path, capsys, network):
    """Folder → features → metrics, naming the network; inception with a random file in the FID layout."""
    write_folder(tmp_path / "a", 0, 6), write_folder(tmp_path / "b", 1, 6)
    flags = ["--features", network, "--k", "2", "--device", "cpu"]
    if network == "inception":
        import inception
        torch.save(inception.random_state_dict(0), tmp_path / "pt_inception.pth")
        flags += ["--weights", str(tmp_path / "pt_inception.pth")]
    metrics.main([str(tmp_path / "a"), str(tmp_path / "b")] + flags)
    out = json.loads(capsys.readouterr().out)
    assert out["n_real"] == out["n_fake"] == 6 and np.isfinite(out["fid"])
    assert out["features"].startswith("inception-v3 pool3" if network == "inception" else "tiny")
