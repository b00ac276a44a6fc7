"""Closed-form checks of diffusion.py: schedule, identities, loss weighting, posterior, sampler, guidance."""
import math

import pytest
import torch

import diffusion as D


def test_schedule_endpoints_and_shift_at_256():
    # Values stated for Semantica @256 with noise resolution 32 (§6.1; simple diffusion's shifted schedule, arXiv 2301.11093 §2).
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
    assert stds == pytest.approx([0.337, 0.403, 0.833], abs=1e-3)  # variance interpolation, gamma 0.2 (§6.1)


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
    assert errors[1][0] < 0.012 and errors[1][1] < 0.012  # 0.467 at N=256 -> 0.498 at N=4096
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


# ----------------------------------------------------------------------------- independent references
# Everything below compares diffusion.py against formulas written out again here with the `math`
# module (scalars, float64): the paper's schedule, the v identities, the eps-space loss, the
# ancestral step and guidance. Nothing is read back from the code under test.

def ref_logsnr(t, image_size, noise_size=32, logsnr_min=-15.0, logsnr_max=15.0):
    """simple diffusion's shifted cosine: -2 log tan(t_min + t (t_max - t_min)) + 2 log(noise / image)."""
    t_min, t_max = math.atan(math.exp(-logsnr_max / 2)), math.atan(math.exp(-logsnr_min / 2))
    return -2 * math.log(math.tan(t_min + t * (t_max - t_min))) + 2 * math.log(noise_size / image_size)


def ref_alpha_sigma(lam):
    return math.sqrt(1 / (1 + math.exp(-lam))), math.sqrt(1 / (1 + math.exp(lam)))


T_GRID = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


@pytest.mark.parametrize("noise_size", [32, 64])
@pytest.mark.parametrize("image_size", [64, 256, 512])
def test_shifted_cosine_schedule_matches_the_paper_formula(image_size, noise_size):
    # simple diffusion §3.2 writes the shift as 2 log(64 / d); Semantica §6.1 uses noise resolution 32.
    t = torch.tensor(T_GRID, dtype=torch.float64)
    want = torch.tensor([ref_logsnr(v, image_size, noise_size) for v in T_GRID], dtype=torch.float64)
    got = D.logsnr_schedule(t, image_size, noise_size=noise_size)
    assert got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=0, atol=1e-9)
    # float32 input: same values to float32 precision, float32 out
    got32 = D.logsnr_schedule(t.float(), image_size, noise_size=noise_size)
    assert got32.dtype == torch.float32 and torch.allclose(got32.double(), want, atol=2e-4)
    # In the middle the cosine is 0, so the log-SNR is the shift alone: SNR(0.5) = (noise / image)^2.
    assert math.exp(got[3].item()) == pytest.approx((noise_size / image_size) ** 2, rel=1e-9)


def test_schedule_default_is_semantica_noise_resolution_32_and_clip_bounds_are_arguments():
    t = torch.tensor(T_GRID, dtype=torch.float64)
    for size in (64, 256, 512):  # §6.1: "cosine adjusted schedule with a noise resolution of 32"
        want = torch.tensor([ref_logsnr(v, size, 32) for v in T_GRID], dtype=torch.float64)
        assert torch.allclose(D.logsnr_schedule(t, size), want, atol=1e-9)
    # Google's guided-distillation configs clip to +-20: the bounds are honoured, and asymmetric ones too.
    for lo, hi in ((-20.0, 20.0), (-10.0, 14.0)):
        want = torch.tensor([ref_logsnr(v, 1, 1, lo, hi) for v in T_GRID], dtype=torch.float64)
        got = D.logsnr_cosine(t, logsnr_min=lo, logsnr_max=hi)
        assert torch.allclose(got, want, atol=1e-9)
        assert got[0].item() == pytest.approx(hi, abs=1e-9) and got[-1].item() == pytest.approx(lo, abs=1e-9)
    # SNR(0.5) at 256 px is exactly (32/256)^2 = 1/64: alpha^2 = 1/65.
    alpha, sigma = D.alpha_sigma(D.logsnr_schedule(torch.tensor(0.5, dtype=torch.float64), 256))
    assert alpha.item() ** 2 == pytest.approx(1 / 65, rel=1e-9) and sigma.item() ** 2 == pytest.approx(64 / 65, rel=1e-9)


def test_alpha_sigma_closed_form():
    lam = torch.tensor([math.log(3.0), 0.0, -math.log(4.0), 12.0, -12.0], dtype=torch.float64)
    alpha, sigma = D.alpha_sigma(lam)
    assert alpha.dtype == sigma.dtype == torch.float64
    want = [ref_alpha_sigma(v) for v in lam.tolist()]
    assert torch.allclose(alpha, torch.tensor([a for a, _ in want], dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.allclose(sigma, torch.tensor([s for _, s in want], dtype=torch.float64), rtol=1e-12, atol=0)
    # lambda = log 3: alpha^2 = 3/4, sigma = 1/2 exactly; lambda = 0: alpha = sigma = sqrt(1/2)
    assert (alpha[0].item(), sigma[0].item()) == pytest.approx((math.sqrt(0.75), 0.5), rel=1e-12)
    assert (alpha[1].item(), sigma[1].item()) == pytest.approx((math.sqrt(0.5), math.sqrt(0.5)), rel=1e-12)
    # float32 stays float32; a python float works too
    a32, s32 = D.alpha_sigma(torch.tensor([math.log(3.0)]))
    assert a32.dtype == torch.float32 and a32.item() == pytest.approx(math.sqrt(0.75), rel=1e-6)
    assert D.alpha_sigma(0.0)[0].item() == pytest.approx(math.sqrt(0.5), rel=1e-6)
    # a bf16 log-SNR (e.g. computed under autocast) is lifted to float32 before the sigmoid
    a16, s16 = D.alpha_sigma(torch.tensor([math.log(3.0)], dtype=torch.bfloat16))
    assert a16.dtype == s16.dtype == torch.float32


def test_v_identities_by_hand_per_example():
    # Two examples with different (alpha, sigma): (0.6, 0.8) and (0.8, 0.6); x, eps constant per example.
    x = torch.tensor([0.5, -1.0]).reshape(2, 1, 1, 1).expand(2, 3, 2, 2)
    eps = torch.tensor([-1.0, 0.25]).reshape(2, 1, 1, 1).expand(2, 3, 2, 2)
    alpha, sigma = torch.tensor([0.6, 0.8]), torch.tensor([0.8, 0.6])
    # v = alpha eps - sigma x: 0.6*(-1) - 0.8*0.5 = -1.0 ; 0.8*0.25 - 0.6*(-1) = 0.8
    v = D.v_from_x_eps(x, eps, alpha, sigma)
    assert torch.allclose(v[:, 0, 0, 0], torch.tensor([-1.0, 0.8]))
    assert v.shape == x.shape and torch.all(v == v[:, :1, :1, :1])
    # z = alpha x + sigma eps: -0.5 ; -0.65
    z = torch.tensor([-0.5, -0.65]).reshape(2, 1, 1, 1).expand(2, 3, 2, 2)
    assert torch.allclose(D.x_from_v(z, v, alpha, sigma)[:, 0, 0, 0], torch.tensor([0.5, -1.0]))
    assert torch.allclose(D.eps_from_v(z, v, alpha, sigma)[:, 0, 0, 0], torch.tensor([-1.0, 0.25]))
    # a scalar alpha/sigma broadcasts over the whole batch
    assert torch.allclose(D.x_from_v(z, v, torch.tensor(0.6), torch.tensor(0.8))[:, 0, 0, 0],
                          torch.tensor([0.6 * -0.5 - 0.8 * -1.0, 0.6 * -0.65 - 0.8 * 0.8]))


def _ref_loss(x, eps, t, v_hat, noise_size=32):
    """eps-space loss written out per example with math: mean over pixels of (eps - (sigma z + alpha v_hat))^2."""
    total, n = 0.0, 0
    for b in range(x.shape[0]):
        a, s = ref_alpha_sigma(ref_logsnr(float(t[b]), x.shape[-1], noise_size))
        for xi, ei, vi in zip(x[b].flatten().tolist(), eps[b].flatten().tolist(), v_hat[b].flatten().tolist()):
            z = a * xi + s * ei
            total += (ei - (s * z + a * vi)) ** 2
            n += 1
    return total / n


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eps_space_loss_by_hand(dtype):
    g = torch.Generator().manual_seed(11)
    # H != W: like the sampler, the loss takes the schedule's image size from the last axis (W = 8)
    x = (torch.rand(2, 3, 4, 8, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    eps = torch.randn(2, 3, 4, 8, generator=g, dtype=torch.float64).to(dtype)
    v_hat = torch.randn(2, 3, 4, 8, generator=g, dtype=torch.float64).to(dtype)
    t = torch.tensor([0.15, 0.7], dtype=dtype)
    seen = {}

    def v_fn(z, tt):
        seen["z"], seen["t"] = z, tt
        return v_hat

    for noise_size in (32, 4):
        loss = D.diffusion_loss(v_fn, x, t=t, eps=eps, noise_size=noise_size)
        want = _ref_loss(x.double(), eps.double(), t.double(), v_hat.double(), noise_size)
        assert loss.dtype == dtype and loss.ndim == 0
        assert loss.item() == pytest.approx(want, rel=1e-9 if dtype == torch.float64 else 1e-4)
    # the network saw z_t = alpha x + sigma eps (Eq. 1) per example, and t itself
    assert torch.equal(seen["t"], t)
    for b in range(2):
        a, s = ref_alpha_sigma(ref_logsnr(t[b].item(), 8, 4))
        assert torch.allclose(seen["z"][b].double(), a * x[b].double() + s * eps[b].double(), atol=1e-5)
    # exact closed form: x = 0, eps = 1, v_hat = 0 at t = 0.5, 256 px: loss = (1 - sigma^2)^2 = (1/65)^2
    ones = torch.ones(1, 1, 256, 256, dtype=dtype)
    loss = D.diffusion_loss(lambda z, tt: torch.zeros_like(z), 0 * ones, t=torch.tensor([0.5], dtype=dtype), eps=ones)
    assert loss.item() == pytest.approx((1 / 65) ** 2, rel=1e-9 if dtype == torch.float64 else 1e-4)


def test_sigmoid_weighted_loss_by_hand():
    """The CPU preset's loss: each example's eps-space loss times sigmoid(b - lambda_t) (Kingma & Gao 2023), then
    the batch mean; b = None is the paper's unweighted loss."""
    g = torch.Generator().manual_seed(5)
    x, eps, v_hat = (torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.1, 0.5, 0.95], dtype=torch.float64)
    v_fn = lambda z, tt: v_hat                               # noqa: E731
    for b in (-1.0, 2.5):
        want = sum(_ref_loss(x[i:i + 1], eps[i:i + 1], t[i:i + 1], v_hat[i:i + 1])
                   / (1 + math.exp(ref_logsnr(float(t[i]), 4) - b)) for i in range(3)) / 3
        assert D.diffusion_loss(v_fn, x, t=t, eps=eps, sigmoid_bias=b).item() == pytest.approx(want, rel=1e-9)
    assert D.diffusion_loss(v_fn, x, t=t, eps=eps, sigmoid_bias=None).item() == pytest.approx(
        _ref_loss(x, eps, t, v_hat), rel=1e-9)


def test_loss_draws_t_uniform_and_eps_gaussian_from_the_generator():
    seen = []

    def v_fn(z, t):
        seen.append((z, t))
        return torch.zeros_like(z)

    x = torch.zeros(64, 1, 16, 16)
    losses = [D.diffusion_loss(v_fn, x, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert losses[0].item() == losses[1].item() != losses[2].item()   # reproducible from the generator
    z, t = seen[0]
    assert t.shape == (64,) and t.dtype == torch.float32 and 0 <= t.min() and t.max() <= 1
    assert len(set(t.tolist())) == 64 and 0.3 < t.mean().item() < 0.7   # U(0, 1), one t per example
    _, sigma = D.alpha_sigma(D.logsnr_schedule(t, 16))
    eps = z / sigma[:, None, None, None]                                # x = 0: z_t = sigma eps
    assert abs(eps.mean().item()) < 0.05 and abs(eps.std().item() - 1) < 0.05  # N(0, I)
    assert torch.equal(seen[0][0], seen[1][0]) and not torch.equal(seen[0][0], seen[2][0])
    # float64 data draws float64 t and eps
    D.diffusion_loss(v_fn, x.double(), generator=torch.Generator().manual_seed(0))
    z, t = seen[-1]
    assert t.dtype == z.dtype == torch.float64
    eps = z / D.alpha_sigma(D.logsnr_schedule(t, 16))[1][:, None, None, None]
    assert (eps.float().double() - eps).abs().max() > 1e-10  # eps drawn in float64, not a float32 upcast


def _ref_step(z, x_hat, lam_t, lam_s, gamma):
    """Ancestral step by hand: posterior mean coefficients and the interpolated std (§3.1, §6.1)."""
    a_t, s_t = ref_alpha_sigma(lam_t)
    a_s, s_s = ref_alpha_sigma(lam_s)
    r = math.exp(lam_t - lam_s)                               # SNR_t / SNR_s
    mean = r * a_s / a_t * z + (1 - r) * a_s * x_hat          # q(z_s | z_t, x = x_hat)
    var_post, var_fwd = (1 - r) * s_s**2, (1 - r) * s_t**2    # "small" and "large" variances
    std = var_fwd ** (gamma / 2) * var_post ** ((1 - gamma) / 2)  # log-space interpolation, weight gamma on forward
    return mean, std


def test_posterior_step_by_hand_per_example_and_gamma():
    lam_t = torch.tensor([-1.0, -6.0], dtype=torch.float64)
    lam_s = torch.tensor([2.0, -5.5], dtype=torch.float64)
    z = torch.tensor([0.7, -1.3], dtype=torch.float64).reshape(2, 1, 1, 1).expand(2, 3, 2, 2)
    x_hat = torch.tensor([-0.4, 0.9], dtype=torch.float64).reshape(2, 1, 1, 1).expand(2, 3, 2, 2)
    for gamma in (0.0, 0.2, 0.5, 1.0):
        mean, std = D.ddpm_posterior(z, x_hat, lam_t, lam_s, gamma)
        assert mean.shape == z.shape and std.shape == (2,)
        for b in range(2):
            m, s = _ref_step(z[b, 0, 0, 0].item(), x_hat[b, 0, 0, 0].item(), lam_t[b].item(), lam_s[b].item(), gamma)
            assert torch.allclose(mean[b], torch.full_like(mean[b], m), rtol=1e-12, atol=1e-14)
            assert std[b].item() == pytest.approx(s, rel=1e-12)
    # §6.1 "interpolation of 0.2" is the default (INTERPRETATION in ddpm_posterior: 20 % toward the forward variance)
    _, std_default = D.ddpm_posterior(z, x_hat, lam_t, lam_s)
    want = [_ref_step(0.0, 0.0, lt, ls, 0.2)[1] for lt, ls in zip(lam_t.tolist(), lam_s.tolist())]
    assert torch.allclose(std_default, torch.tensor(want, dtype=torch.float64), rtol=1e-12)
    # the math runs in z_t's precision whatever the log-SNR arrives as (python floats, float32 tensors)
    for lt, ls in ((-1.0, 2.0), (torch.tensor(-1.0), torch.tensor(2.0))):
        mean, std = D.ddpm_posterior(z, x_hat, lt, ls, 0.2)
        m, sd = _ref_step(0.7, -0.4, -1.0, 2.0, 0.2)
        assert mean.dtype == std.dtype == torch.float64
        assert std.item() == pytest.approx(sd, rel=1e-12) and mean[0, 0, 0, 0].item() == pytest.approx(m, rel=1e-12)
    # float32 in, float32 out, same values
    m32, s32 = D.ddpm_posterior(z.float(), x_hat.float(), lam_t.float(), lam_s.float(), 0.2)
    assert m32.dtype == s32.dtype == torch.float32 and torch.allclose(s32.double(), std_default, rtol=1e-5)


def test_ddpm_sampler_matches_a_hand_written_ancestral_loop():
    # Three steps t = 1 -> 2/3 -> 1/3 -> 0 on 8 px "images" (schedule shift 2 log(32/8)); the network is a
    # fixed affine function of (z, t) chosen so that x_hat leaves [-1, 1] and clipping matters.
    steps, size = 3, 8
    calls = []

    def v_fn(z, t):
        calls.append(t.clone())
        return 0.3 * z - 1.5 * t[:, None, None, None] + 0.2

    noise = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def reference(gamma, clip):
        g = torch.Generator().manual_seed(8)
        z = noise.clone()
        for i in range(steps, 0, -1):
            t = i / steps
            lam_t = ref_logsnr(t, size)
            a_t, s_t = ref_alpha_sigma(lam_t)
            x_hat = a_t * z - s_t * (0.3 * z - 1.5 * t + 0.2)
            if clip:
                x_hat = x_hat.clamp(-1, 1)
            if i == 1:
                return x_hat                                  # last step: x_hat, no noise
            mean, std = _ref_step(z, x_hat, lam_t, ref_logsnr((i - 1) / steps, size), gamma)
            z = mean + std * torch.randn(z.shape, generator=g, dtype=torch.float64)

    for kwargs, gamma, clip in (({}, 0.2, True), ({"gamma": 1.0, "clip": False}, 1.0, False),
                                ({"gamma": 0.0}, 0.0, True)):
        calls.clear()
        out = D.ddpm_sample(v_fn, noise, steps, generator=torch.Generator().manual_seed(8), **kwargs)
        want = reference(gamma, clip)
        assert out.dtype == torch.float64 and torch.allclose(out, want, rtol=0, atol=1e-10), kwargs
        assert [c.tolist() for c in calls] == [[1.0, 1.0], [2 / 3, 2 / 3], [1 / 3, 1 / 3]]
    assert out.abs().max() == 1.0 and (out.abs() == 1.0).any()        # clip active in this example
    # noise_size reaches the schedule: a 16 px reference resolution gives a different result
    ref16 = D.ddpm_sample(v_fn, noise, steps, noise_size=16, generator=torch.Generator().manual_seed(8), clip=False)
    assert not torch.allclose(ref16, D.ddpm_sample(v_fn, noise, steps, generator=torch.Generator().manual_seed(8),
                                                   clip=False))


def test_guidance_direction_by_hand():
    # Ho & Salimans: (1 + w) v_cond - w v_null; w > 0 moves away from the null prediction.
    vc, vu = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 1.0, 0.5])
    assert torch.allclose(D.guided(vc, vu, 0.5), torch.tensor([2.5, -2.0, 0.5]))
    assert torch.allclose(D.guided(vc, vu, 1.5), torch.tensor([3.5, -4.0, 0.5]))
    assert torch.equal(D.guided(vc, vu, 0.0), vc) and torch.equal(D.guided(vc, vu, 0), vc)
    # per-example w broadcasts
    w = torch.tensor([[0.0], [1.0]])
    assert torch.allclose(D.guided(vc.expand(2, 3), vu.expand(2, 3), w), torch.tensor([[2.0, -1.0, 0.5], [3.0, -3.0, 0.5]]))
    assert D.GUIDANCE == 0.5 and D.GAMMA == 0.2 and D.NOISE_SIZE == 32  # §6.1 ablation defaults


def test_ddpm_sample_with_one_generator_per_row_draws_each_row_alone():
    """generator=[g_0, ..., g_{B-1}]: row r's step noise comes from g_r only, so a batch of rows equals each
    row sampled on its own with a batch of one and the same generator (per-image noise)."""
    weight = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))

    def v_fn(z, t):                                                 # any smooth function of (z, t)
        return torch.einsum("ij,bjhw->bihw", weight, z) * t.view(-1, 1, 1, 1)

    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    rows = D.ddpm_sample(v_fn, noise, 5, gamma=0.2, generator=[torch.Generator().manual_seed(10 + r) for r in range(3)])
    for r in range(3):
        alone = D.ddpm_sample(v_fn, noise[r:r + 1], 5, gamma=0.2, generator=torch.Generator().manual_seed(10 + r))
        assert torch.allclose(rows[r:r + 1], alone, atol=1e-6)
    with pytest.raises(ValueError, match="generators"):
        D.ddpm_sample(v_fn, noise, 5, generator=[torch.Generator()])
