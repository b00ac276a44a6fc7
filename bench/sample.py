"""Benchmark guided sampling: images/s at 256 DDPM steps, conditional and null passes in one batch.

Semantica §6.1: the DDPM sampler (gamma 0.2) with guidance 0.5, (1 + w) v_cond - w v_uncond; the
timed call is `Semantica.sample`, which evaluates the conditional and the null-conditioned pass
as one batch of 2 x (conditioning images x samples) per step. The frozen encoder is not timed:
`sample` gets precomputed tokens of the encoder's shape (bench/workload.py, as bench/train_step.py).

--steps below 256 gives a quick estimate: every DDPM step costs the same (one network forward at
a fixed batch plus O(image) schedule math), so the time at 256 steps is the measured time per step
x 256; the output says when it is extrapolated. FLOPs of one network forward are counted with
FlopCounterMode on a meta-device copy (SDPA through its math backend, as in train_step.py); MFU is
against the card's dense bf16 peak (workload.BF16_PEAK_TFLOPS). Guidance 0 skips the null pass.

    python bench/sample.py --preset tiny-32 --device cpu --cond-images 2 --num-samples 2 --steps 4
    python bench/sample.py --preset sid-b-256 --cond-images 8 --num-samples 8 --steps 16 --bf16
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
import semantica  # noqa: E402
import uvit  # noqa: E402
from workload import DEFAULT_ENCODER, peak_tflops, sync, token_shape  # noqa: E402 (bench/)

DDPM_STEPS = semantica.DDPM_STEPS  # DESIGN (the paper gives no step count): the figure of merit's steps


def forward_flops(config, tokens):
    """Model FLOPs of one network forward per image, counted on a meta-device copy."""
    with torch.device("meta"):
        net = uvit.UViT(config).eval()
        s = config.image_size
        z, t, cond = torch.randn(1, 3, s, s), torch.rand(1), torch.randn(1, tokens, config.cond_dim)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        net(z, t, cond)
    return counter.get_total_flops()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=None, choices=sorted(uvit.PRESETS),
                   help="default: sid-b-256 on CUDA, tiny-32 on CPU")
    p.add_argument("--encoder", default=None, help="token shape source; default per preset")
    p.add_argument("--cond-images", type=int, default=None, help="conditioning images; default 8 CUDA, 2 CPU")
    p.add_argument("--num-samples", type=int, default=None, help="samples per image; default 8 CUDA, 2 CPU")
    p.add_argument("--steps", type=int, default=DDPM_STEPS, help="DDPM steps timed (< 256: extrapolated)")
    p.add_argument("--guidance", type=float, default=0.5)  # §6.1
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast; default on for CUDA")
    p.add_argument("--compile", action="store_true", help="model.net.compile() (compiled on a 2-step warm-up)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="append the result (JSON line) to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    preset = args.preset or ("sid-b-256" if cuda else "tiny-32")
    encoder = args.encoder or DEFAULT_ENCODER.get(preset, "dinov2-b14")
    b = args.cond_images or (8 if cuda else 2)
    n = args.num_samples or (8 if cuda else 2)
    bf16 = cuda if args.bf16 is None else args.bf16
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    torch.manual_seed(0)
    tokens, dim = token_shape(encoder)
    with torch.device(device):
        model = semantica.Semantica(dataclasses.replace(uvit.PRESETS[preset], cond_dim=dim)).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    cond = torch.randn(b, tokens, dim, device=device)
    flops_fwd = forward_flops(model.net.config, tokens)
    if args.compile:
        model.net.compile()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def run(steps):
        with autocast:
            return model.sample(cond=cond, num_samples=n, steps=steps, guidance=args.guidance, seed=0)

    t0 = time.perf_counter()
    run(2)  # warm-up (compilation, cuDNN autotuning)
    sync(device)
    t_warm = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = run(args.steps)
    sync(device)
    dt = time.perf_counter() - t0
    if out.shape[:2] != (b, n) or not torch.isfinite(out).all():
        raise RuntimeError(f"sample returned shape {tuple(out.shape)} / non-finite values")
    per_step = dt / args.steps
    t256 = per_step * DDPM_STEPS
    images = b * n
    passes = 1 if args.guidance == 0 else 2  # cond + null per image per step (Semantica.sample)
    tflops = passes * images * flops_fwd / per_step / 1e12
    peak = peak_tflops(device)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU x{torch.get_num_threads()} threads"
    row = dict(bench="sample", preset=preset, device=name, torch=torch.__version__, bf16=bf16,
               compile=args.compile, channels_last=args.channels_last, images=images,
               network_batch=passes * images, steps_timed=args.steps, extrapolated=args.steps != DDPM_STEPS,
               ms_per_step=1e3 * per_step, s_per_batch_256=t256, img_s_256=images / t256,
               tflops=tflops, mfu=tflops / peak if peak else None, gflop_fwd_per_img=flops_fwd / 1e9,
               warmup_s=t_warm, peak_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None)
    note = f" (extrapolated from {args.steps} steps)" if row["extrapolated"] else ""
    mfu = "n/a" if row["mfu"] is None else f"{row['mfu']:.1%}"
    print(f"{name}: {preset}, {b} x {n} images, network batch {passes * images}, bf16 {bf16}, compile {args.compile}: "
          f"{1e3 * per_step:.1f} ms/step -> {images / t256:.3g} images/s at {DDPM_STEPS} steps{note}; "
          f"{tflops:.3g} TFLOP/s, MFU {mfu}", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main()
