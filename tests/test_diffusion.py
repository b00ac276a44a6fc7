"""Closed-form checks of diffusion.py: schedule, identities, loss weighting, posterior, sampler, guidance."""
import math

import pytest
import torch

import diffusion as D


def test_schedule_endpoints_and_shift_at_256():
    # Values stated for Semantica @256 with noise resolution 32 (§6.1; diffusion.md §1.2).
    lam = D.logsnr_schedule(torch.tensor([0.0, 0.5, 1.0]), image_size=256)
    assert torch.allclose(lam, torch.tensor([10.841, -4.159, -19.159]), atol=1e-3)
    shift = D.logsnr_schedule(torch.tensor(0.3), 256) - D.logsnr_cosine(torch.tensor(0.3))
    assert shift.item() == pytest.approx(2 * math.log(32 / 256), abs=1e-5)
    # The shift scales the SNR by exactly (32/256)^2.
    assert torch.exp(shift).item() == pytest.approx((32 / 256) ** 2, rel=1e-5)
    # Unshifted cosine: clipped to [-15, 15], zero in the middle, finite at both ends.
    assert torch.allclose(D.logsnr_cosine(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([15.0, 0.0, -15.0]), atol=1e-4)
    assert D.logsnr_schedule(torch.tensor(0.0), image_size=32).item() == pytest.approx(15.0, abs=1e-4)


def test_schedule_is_monotone_decreasing():
    lam = D.logsnr_schedule(torch.linspace(0, 1, 1001), 256)
    assert torch.all(lam[1:] < lam[:-1])


def test_alpha_sigma_variance_preserving():
    lam = torch.linspace(-25, 25, 501)
    alpha, sigma = D.alpha_sigma(lam)
    assert torch.allclose(alpha**2 + sigma**2, torch.ones_like(lam), atol=1e-6)
    assert torch.allclose(torch.log(alpha**2 / sigma**2)[100:400], lam[100:400], atol=1e-4)


def test_v_round_trip():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    alpha, sigma = D.alpha_sigma(D.logsnr_schedule(torch.rand(4, generator=g), 8))
    z = D._expand(alpha, x) * x + D._expand(sigma, x) * eps
    v = D.v_from_x_eps(x, eps, alpha, sigma)
    assert torch.allclose(D.x_from_v(z, v, alpha, sigma), x, atol=1e-5)
    assert torch.allclose(D.eps_from_v(z, v, alpha, sigma), eps, atol=1e-5)


def test_eps_loss_is_snr_weighted_x_loss_and_sigmoid_weighted_v_loss():
    # §3.1: w(t) = SNR(t) in Eq. 1 is the eps-space loss.
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(1, 3, 16, 16, generator=g, dtype=torch.float64)
    t = torch.tensor([0.3], dtype=torch.float64)
    v_wrong = torch.randn(1, 3, 16, 16, generator=g, dtype=torch.float64)
    loss = D.diffusion_loss(lambda z, tt: v_wrong, x, t=t, eps=eps)
    lam = D.logsnr_schedule(t, 16)
    alpha, sigma = D.alpha_sigma(lam)
    z = alpha * x + sigma * eps
    x_loss = (x - D.x_from_v(z, v_wrong, alpha, sigma)).square().mean()
    v_loss = (D.v_from_x_eps(x, eps, alpha, sigma) - v_wrong).square().mean()
    assert loss.item() == pytest.approx((torch.exp(lam) * x_loss).item(), rel=1e-9)
    assert loss.item() == pytest.approx((torch.sigmoid(lam) * v_loss).item(), rel=1e-9)
    # The exact v gives zero loss.
    v_true = D.v_from_x_eps(x, eps, alpha, sigma)
    assert D.diffusion_loss(lambda z, tt: v_true, x, t=t, eps=eps).item() < 1e-20


def test_posterior_matches_monte_carlo_forward_process():
    # Simulate x -> z_s -> z_t and regress z_s on z_t: slope, intercept and residual variance
    # must equal the closed-form posterior used by the sampler (gamma = 0).
    g = torch.Generator().manual_seed(2)
    n, x = 400_000, 0.6
    lam_s, lam_t = torch.tensor(1.3, dtype=torch.float64), torch.tensor(-0.8, dtype=torch.float64)
    a_s, s_s = D.alpha_sigma(lam_s)
    a_t, s_t = D.alpha_sigma(lam_t)
    z_s = a_s * x + s_s * torch.randn(n, generator=g, dtype=torch.float64)
    a_ts = a_t / a_s
    z_t = a_ts * z_s + torch.sqrt(s_t**2 - a_ts**2 * s_s**2) * torch.randn(n, generator=g, dtype=torch.float64)
    cov = torch.cov(torch.stack([z_t, z_s]))
    slope = cov[0, 1] / cov[0, 0]
    intercept = z_s.mean() - slope * z_t.mean()
    resid_var = (z_s - intercept - slope * z_t).var()
    zt_grid = torch.tensor([[[[0.0]]], [[[1.0]]]], dtype=torch.float64)
    mean, std = D.ddpm_posterior(zt_grid, torch.full_like(zt_grid, x), lam_t, lam_s, gamma=0.0)
    assert (mean[1] - mean[0]).item() == pytest.approx(slope.item(), abs=5e-3)
    assert mean[0].item() == pytest.approx(intercept.item(), abs=5e-3)
    assert (std**2).item() == pytest.approx(resid_var.item(), rel=1e-2)


def test_variance_interpolation_endpoints_and_worked_example():
    z = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    lt, ls = torch.tensor(-1.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    r = math.exp(-3.0)
    stds = [D.ddpm_posterior(z, z, lt, ls, g)[1].item() for g in (0.0, 0.2, 1.0)]
    assert stds[0] == pytest.approx(math.sqrt((1 - r) * torch.sigmoid(-ls).item()), rel=1e-9)  # posterior
    assert stds[2] == pytest.approx(math.sqrt((1 - r) * torch.sigmoid(-lt).item()), rel=1e-9)  # forward
    assert stds == pytest.approx([0.337, 0.403, 0.833], abs=1e-3)  # diffusion.md §3.2


def _gaussian_v_fn(mu, s, image_size):
    """Exact v for data x ~ N(mu, s^2) i.i.d. per pixel (the Bayes-optimal denoiser)."""
    def v_fn(z, t):
        alpha, sigma = D.alpha_sigma(D.logsnr_schedule(t, image_size))
        a, sg = D._expand(alpha, z), D._expand(sigma, z)
        x_hat = mu + a * s**2 * (z - a * mu) / (a**2 * s**2 + sg**2)
        return (a * z - x_hat) / sg  # inverts x = alpha z - sigma v (test-side division is fine)
    return v_fn


def test_sampler_reproduces_gaussian_data_and_improves_with_steps():
    # 64 x 256 "images": the schedule reads the size 256 from the last axis (Semantica's shift),
    # 16k i.i.d. pixels estimate mean and std to ~0.003.
    mu, s = 0.2, 0.5
    v_fn = _gaussian_v_fn(mu, s, 256)
    errors = []
    for steps in (32, 2048):
        g = torch.Generator().manual_seed(3)
        noise = torch.randn(1, 1, 64, 256, generator=g, dtype=torch.float64)
        x = D.ddpm_sample(v_fn, noise, steps, clip=False, generator=g)
        errors.append((abs(x.mean().item() - mu), abs(x.std().item() - s)))
    assert errors[1][0] < 0.012 and errors[1][1] < 0.012  # diffusion.md §3.3: 0.467 at N=256 -> 0.498 at N=4096
    assert errors[1][1] < errors[0][1] / 5


def test_guidance_zero_is_conditional_and_guidance_commutes_with_parameterisation():
    g = torch.Generator().manual_seed(4)
    vc, vu, z = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    assert torch.equal(D.guided(vc, vu, 0.0), vc)
    alpha, sigma = D.alpha_sigma(torch.tensor([0.4, -2.0]))
    w = 0.5
    via_v = D.x_from_v(z, D.guided(vc, vu, w), alpha, sigma)
    via_x = D.guided(D.x_from_v(z, vc, alpha, sigma), D.x_from_v(z, vu, alpha, sigma), w)
    assert torch.allclose(via_v, via_x, atol=1e-5)


def test_math_stays_float32_under_bf16_autocast():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lam = D.logsnr_schedule(torch.rand(2).bfloat16(), 8)
        alpha, sigma = D.alpha_sigma(lam)
        loss = D.diffusion_loss(lambda z, t: torch.nn.functional.linear(z, torch.eye(8)), x)
    assert lam.dtype == alpha.dtype == sigma.dtype == loss.dtype == torch.float32


def test_fixed_generator_gives_identical_samples_and_last_step_is_noise_free():
    v_fn = _gaussian_v_fn(0.0, 0.5, 16)
    runs = [D.ddpm_sample(v_fn, torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)), 8,
                          generator=torch.Generator().manual_seed(6)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert runs[0].abs().max() <= 1.0  # clipped x_hat, returned without added noise
    with pytest.raises(ValueError):
        D.ddpm_sample(v_fn, torch.zeros(1, 3, 16, 16), 0)
