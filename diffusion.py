"""Diffusion math for Semantica: schedule, v-parameterisation, ε-space loss, DDPM sampler, guidance.

Semantica (arXiv 2405.14857) inherits its diffusion process from *simple diffusion* (Hoogeboom,
Heek & Salimans 2023, arXiv 2301.11093); §3.1 and §6.1 of Semantica state what is used:
  - a variance-preserving process z_t = alpha_t x + sigma_t eps, t ~ U(0, 1)            (Eq. 1)
  - "cosine adjusted schedule with a noise resolution of 32"                             (§6.1)
  - "v-prediction with loss in epsilon space", i.e. w(t) = SNR(t) in Eq. 1               (§3.1, §6.1)
  - "the DDPM sampler with an interpolation of 0.2" and guidance 0.5 for ablations       (§6.1)

Everything here is a small pure function on tensors. The network, the process, the sampler and
guidance meet through one callable `v_fn(z_t, t) -> v`, with t of shape (B,) in [0, 1]
(t = 0 clean, t = 1 pure noise). All schedule, posterior and loss math runs in float32 (or
float64 when given float64) even when the network runs under bf16 autocast, and nothing divides
by alpha or sigma: ratios are formed in log space from log-sigmoids of the log-SNR.

Notation: x data in [-1, 1]; eps ~ N(0, I); logsnr = lambda = log(alpha^2 / sigma^2);
alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda); a sampler step goes from t to s < t.
Shapes: x, z_t, eps, v are (B, C, H, W); t and logsnr are (B,) or scalars.

Toy-preset deviation: `sigmoid_bias` weights the eps-space loss by sigmoid(b - lambda) (Kingma & Gao 2023,
arXiv 2303.00848; SiD2, arXiv 2410.19324), which favours low SNR; the paper's loss is the unweighted one.
Not implemented (not needed by the paper at 256/512 px as described): simple diffusion's
interpolated schedule and multiscale loss, other samplers (DDIM, DPM-Solver).
Formulas and their numerical checks: tests/test_diffusion.py.
"""
import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

LOGSNR_MIN, LOGSNR_MAX = -15.0, 15.0  # simple diffusion appendix pseudocode: cosine clipped to [-15, 15]
NOISE_SIZE = 32  # Semantica §6.1: "cosine adjusted schedule with a noise resolution of 32"
GAMMA = 0.2      # Semantica §6.1: "DDPM sampler with an interpolation of 0.2" (see ddpm_posterior)
GUIDANCE = 0.5   # Semantica §6.1: "0.5 guidance for our ablations"


def _expand(a, x):
    """Broadcast a per-example (B,) or scalar tensor against x (B, C, H, W)."""
    a = torch.as_tensor(a, device=x.device)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def _math_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _randn(shape, generator, device, dtype):
    """N(0, I) noise of `shape` on `device`; `generator` is one torch.Generator (or None), or a list with one
    per row (shape[0] of them), so that each row's draws do not depend on the other rows (Semantica.sample).
    Each generator draws on its own device and the noise is moved: a device without generators (torch_xla)
    samples from CPU generators."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]} rows")
        return torch.stack([torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype).to(device)
                            for g in generator])
    on = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=on, dtype=dtype).to(device)


# ----------------------------------------------------------------------------- schedule

def logsnr_cosine(t, logsnr_min=LOGSNR_MIN, logsnr_max=LOGSNR_MAX):
    """Clipped cosine schedule in log-SNR form; the clip acts on t, so t in {0, 1} is finite."""
    t = torch.as_tensor(t)
    t = t.to(_math_dtype(t))
    t_min = math.atan(math.exp(-0.5 * logsnr_max))
    t_max = math.atan(math.exp(-0.5 * logsnr_min))
    return -2.0 * torch.log(torch.tan(t_min + t * (t_max - t_min)))  # lambda_cos(t) = -2 log tan(.)


def logsnr_schedule(t, image_size, noise_size=NOISE_SIZE):
    """Semantica's schedule: the clipped cosine, then shifted by 2 log(noise_size / image_size).

    "Cosine adjusted" (simple diffusion §3.2): at image side d the SNR is the d_noise-reference
    SNR times (d_noise / d)^2, so that the SNR of the image average-pooled to d_noise matches the
    reference schedule. Clip-then-shift as in the paper's pseudocode: at 256 px lambda runs over
    [-19.159, 10.841]. Always float32 (float64 for float64 t), also under autocast.
    """
    # Autocast never lowers tan/log below float32, and logsnr_cosine casts t up to float32 first.
    return logsnr_cosine(t) + 2.0 * math.log(noise_size / image_size)  # shift: simple diffusion §3.2


def alpha_sigma(logsnr):
    """(alpha, sigma) = (sqrt(sigmoid(lambda)), sqrt(sigmoid(-lambda))), so alpha^2 + sigma^2 = 1."""
    logsnr = torch.as_tensor(logsnr)
    logsnr = logsnr.to(_math_dtype(logsnr))
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


# ----------------------------------------------------------------------------- v-parameterisation

def v_from_x_eps(x, eps, alpha, sigma):
    """v = alpha eps - sigma x (Salimans & Ho 2022, App. D)."""
    return _expand(alpha, x) * eps - _expand(sigma, x) * x


def x_from_v(z_t, v, alpha, sigma):
    """x_hat = alpha z_t - sigma v_hat (no division by alpha)."""
    return _expand(alpha, z_t) * z_t - _expand(sigma, z_t) * v


def eps_from_v(z_t, v, alpha, sigma):
    """eps_hat = sigma z_t + alpha v_hat (no division by sigma)."""
    return _expand(sigma, z_t) * z_t + _expand(alpha, z_t) * v


# ----------------------------------------------------------------------------- training loss

def diffusion_loss(v_fn, x, *, noise_size=NOISE_SIZE, t=None, eps=None, generator=None, sigmoid_bias=None):
    """Semantica's training loss: v-prediction with the loss in eps space (§3.1, §6.1).

    t ~ U(0, 1), z_t = alpha x + sigma eps (Eq. 1), v_hat = v_fn(z_t, t), eps_hat = sigma z_t + alpha v_hat,
    loss = mean ||eps - eps_hat||^2, which equals the Eq. 1 x-loss with w(t) = SNR(t).
    sigmoid_bias b (DEVIATION, the CPU preset only): each example's mean squared eps error is weighted by
    sigmoid(b - lambda_t) before the batch mean (the sigmoid weighting of Kingma & Gao 2023, with t still drawn
    uniformly under this schedule), which down-weights low noise; None: the paper's unweighted loss.
    `t` and `eps` may be given (tests, exact DDP checks); otherwise drawn from `generator`.
    The network's output may be bf16; the loss is formed in float32. -> scalar.
    """
    dtype = _math_dtype(x)
    x = x.to(dtype)
    b = x.shape[0]
    if t is None:
        t = torch.rand(b, generator=generator, device=x.device, dtype=dtype)  # t ~ U(0, 1)
    if eps is None:
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=dtype)
    logsnr = logsnr_schedule(t, x.shape[-1], noise_size)
    alpha, sigma = alpha_sigma(logsnr)
    z_t = _expand(alpha, x) * x + _expand(sigma, x) * eps  # Eq. 1
    v_hat = v_fn(z_t, t).to(dtype)
    eps_hat = eps_from_v(z_t, v_hat, alpha, sigma)
    if sigmoid_bias is None:
        return (eps - eps_hat).square().mean()  # eps-space loss = SNR(t)-weighted x-loss
    per_example = (eps - eps_hat).square().flatten(1).mean(1)
    return (torch.sigmoid(sigmoid_bias - logsnr) * per_example).mean()  # Kingma & Gao 2023 sigmoid weighting


# ----------------------------------------------------------------------------- sampler

def ddpm_posterior(z_t, x_hat, logsnr_t, logsnr_s, gamma=GAMMA):
    """Mean and std of the ancestral step z_t -> z_s (s < t) given the denoised estimate x_hat.

    With r = SNR_t / SNR_s = exp(lambda_t - lambda_s):
      mean = r (alpha_s / alpha_t) z_t + (1 - r) alpha_s x_hat               (posterior q(z_s | z_t, x))
      std  = sqrt(1 - r) sigma_t^gamma sigma_s^(1 - gamma)
    gamma = 0 is the posterior ("small") variance (1 - r) sigma_s^2, gamma = 1 the forward ("large")
    variance (1 - r) sigma_t^2; in between the two are interpolated in log space.
    # INTERPRETATION: Semantica §6.1 writes the std as sigma_{t->s}^0.2 sigma_{s|t}^0.8. We follow the
    # authors' code lineage (Google's `fixed_medium:0.2`: 20 % of the way, in log space, from the
    # posterior toward the forward variance). The literal reading in simple-diffusion notation is
    # gamma = 0.8, one argument away.
    All ratios are formed in log space: no division by alpha or sigma.
    """
    dtype = _math_dtype(z_t)
    lt = torch.as_tensor(logsnr_t, device=z_t.device).to(dtype)
    ls = torch.as_tensor(logsnr_s, device=z_t.device).to(dtype)
    log_r = lt - ls                                            # log(SNR_t / SNR_s) < 0
    one_minus_r = -torch.expm1(log_r)                          # 1 - r, accurate for r near 1
    log_alpha_t, log_alpha_s = 0.5 * F.logsigmoid(lt), 0.5 * F.logsigmoid(ls)
    log_sigma_t, log_sigma_s = 0.5 * F.logsigmoid(-lt), 0.5 * F.logsigmoid(-ls)
    coef_z = torch.exp(log_r + log_alpha_s - log_alpha_t)      # r alpha_s / alpha_t
    coef_x = one_minus_r * torch.exp(log_alpha_s)              # (1 - r) alpha_s
    mean = _expand(coef_z, z_t) * z_t + _expand(coef_x, z_t) * x_hat
    std = torch.exp(0.5 * torch.log(one_minus_r) + gamma * log_sigma_t + (1 - gamma) * log_sigma_s)
    return mean, std


def guided(v_cond, v_uncond, w):
    """Classifier-free guidance (Ho & Salimans 2022): (1 + w) v_cond - w v_uncond.

    w = 0 is the purely conditional model; Semantica uses w = 0.5 for ablations (§6.1) and sweeps
    0.0-1.5 in App. H. Being affine with weights summing to 1, guidance on v equals guidance on eps
    or on x_hat. Callers evaluate the conditional and null passes as one batch.
    """
    return (1.0 + w) * v_cond - w * v_uncond


@torch.no_grad()
def ddpm_sample(v_fn, noise, steps, *, gamma=GAMMA, noise_size=NOISE_SIZE, clip=True, generator=None,
                progress=False, on_step=None):
    """Ancestral DDPM sampling (Ho et al. 2020; Semantica §3.1) from t = 1 to t = 0 on a uniform grid.

    noise: z_1 ~ N(0, I), (B, C, H, W); the image size for the schedule is noise.shape[-1].
    Each step t = i/N -> s = (i-1)/N evaluates v_hat = v_fn(z_t, t) (t of shape (B,)),
    x_hat = alpha_t z_t - sigma_t v_hat, optionally clipped to [-1, 1], then draws
    z_s ~ N(mean, std^2) from `ddpm_posterior`. The last step returns x_hat without noise.
    generator: a torch.Generator for the step noise, or a list of B generators, one per row.
    progress=True shows a tqdm bar (steps done, rate, ETA) on stderr.
    on_step: called with no arguments after every step (train.py under torch_xla: torch_xla.sync, so that
    the lazily traced graph is one step, compiled once, rather than all `steps` of them).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    dtype = _math_dtype(noise)
    z = noise.to(dtype)
    b, image_size = z.shape[0], z.shape[-1]
    for i in tqdm(range(steps, 0, -1), desc="ddpm steps", total=steps, disable=not progress):
        # t and s are made on the CPU and moved: data, not constants of the graph, so that under torch_xla
        # every step traces the same graph (compiled once, not once per step)
        t = torch.full((b,), i / steps, dtype=dtype).to(z.device)
        logsnr_t = logsnr_schedule(t, image_size, noise_size)
        alpha_t, sigma_t = alpha_sigma(logsnr_t)
        x_hat = x_from_v(z, v_fn(z, t).to(dtype), alpha_t, sigma_t)
        if clip:
            x_hat = x_hat.clamp(-1.0, 1.0)
        if i == 1:
            z = x_hat  # s = 0: return the denoised estimate, no noise
        else:
            logsnr_s = logsnr_schedule(torch.full((b,), (i - 1) / steps, dtype=dtype).to(z.device), image_size,
                                       noise_size)
            mean, std = ddpm_posterior(z, x_hat, logsnr_t, logsnr_s, gamma)
            xi = _randn(z.shape, generator, z.device, dtype)
            z = mean + _expand(std, z) * xi
        if on_step is not None:
            on_step()
    return z
