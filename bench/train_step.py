"""Benchmark one Semantica training step: images/s, TFLOP/s, MFU and peak memory per image.

The step timed is train.py's optimiser step on one device (Semantica §6.1): `Semantica.forward`
(the v-prediction, eps-space diffusion loss of Eq. 1 with condition dropout), backward, fused Adam
(beta1 0.9, beta2 0.99, eps 1e-12) and the EMA update (`semantica.update_ema`, Polyak 0.9999; timed
on its own too, `--no-ema` leaves it out). The frozen encoder is NOT timed: like the paper, which
precomputes encoder features (§3.2), the step gets precomputed tokens of the encoder's shape
(DINOv2-B/14 at 224 px: 257 tokens x 768 for sid-b-256; DINOv2-L/14: 257 x 1024 for semantica-512).

Modes, each on a freshly built model, optimiser and EMA (same seed), in the order given:
    eager     fp32 weights and activations (TF32 matmuls on CUDA, as train.py sets)
    bf16      bf16 autocast, fp32 master weights (train.py's default on CUDA)
    compile   bf16 autocast + `model.net.compile()` in place (train.py --compile)
--channels-last stores the conv weights and the input channels-last (mode names get "+cl").
--parts also times Adam and the EMA alone and reports mfu_fwd_bwd (what gradient accumulation
approaches); --sync-check lists the host syncs of one step; compile rows carry dynamo's graph breaks.

FLOPs: torch.utils.flop_counter.FlopCounterMode over one forward + backward of one image on a
meta-device copy of the model, times the batch (every op is per-example). Attention is counted
through SDPA's math backend (2 matmuls forward, 4 backward), i.e. *model* FLOPs, the PaLM /
nanoGPT MFU convention: flash attention's backward recomputation and activation checkpointing's
recomputed forward are not counted; norms and pointwise ops are not FLOPs here. MFU = achieved
FLOP/s / the card's dense bf16 peak (workload.BF16_PEAK_TFLOPS; also for the fp32 mode, so modes compare
on one scale). CPU: TFLOP/s only.
Memory: peak allocated (CUDA) and (peak - resident state) / batch = activations per image (the
gradients, freed after each step, are included; --find-max-batch reports instead the marginal
memory per image between the smallest and the largest batch that fit, where constants cancel).

--find-max-batch (for semantica-512 with --grad-checkpoint): doubles, then bisects, the batch
until CUDA runs out of memory; if batch 1 does not fit with the EMA, retries without it. Then
times the step at the largest batch and prints what FSDP over 8 cards would need (state / 8).

    python bench/train_step.py --preset tiny-32 --device cpu --batch 8 --steps 3 --warmup 1
    python bench/train_step.py --preset sid-b-256 --batch 16 --modes compile,bf16,eager --parts --sync-check
    python bench/train_step.py --preset semantica-512 --modes bf16 --grad-checkpoint --find-max-batch
"""
import argparse
import dataclasses
import json
import os
import sys
import time
import warnings

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
import semantica  # noqa: E402
import uvit  # noqa: E402
from workload import DEFAULT_ENCODER, free_memory, peak_tflops, sync, token_shape  # noqa: E402 (bench/)

GLOBAL_BATCH = 2048  # §6.1
GiB = 2 ** 30


def build(args, device):
    """Seeded Semantica (no encoder), fused Adam (§6.1), EMA copy; train.py's construction order."""
    torch.manual_seed(0)
    tokens, dim = token_shape(args.encoder)
    config = dataclasses.replace(uvit.PRESETS[args.preset], cond_dim=dim)
    with torch.device(device):  # initialise on the device: 4 B parameters initialise slowly on a CPU
        model = semantica.Semantica(config).train()
    model.net.grad_checkpoint = args.grad_checkpoint
    if args.channels_last:
        model.to(memory_format=torch.channels_last)  # conv weights; conv outputs follow them
    ema = None if args.no_ema else model.ema_copy()  # train.py's EMA: a frozen copy
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.9, 0.99), eps=1e-12,
                           fused=device.type == "cuda")  # §6.1; train.py uses fused on CUDA
    return model, opt, ema, tokens


def make_batch(model, batch, tokens, device, channels_last=False):
    """Target images in [-1, 1] (B, 3, S, S) and encoder tokens (B, T_c, cond_dim)."""
    c = model.net.config
    x = torch.rand(batch, 3, c.image_size, c.image_size, device=device) * 2 - 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randn(batch, tokens, c.cond_dim, device=device)


def count_flops(config, tokens, n=1):
    """Model FLOPs of one forward + backward per image, counted on a meta-device copy (no memory, no time)."""
    with torch.device("meta"):
        model = semantica.Semantica(config).train()
        x, cond = make_batch(model, n, tokens, torch.device("meta"))
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(x, cond).backward()  # no activation checkpointing: its recomputed forward is not counted
    return counter.get_total_flops() / n


def make_step(model, opt, ema, autocast, gen):
    """train.py's optimiser step without accumulation: loss, backward, Adam, EMA."""
    def step(x, cond):
        with autocast:
            loss = model(x, cond, generator=gen)  # Eq. 1 in eps space (§6.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            semantica.update_ema(ema, model, 0.9999)  # §6.1 Polyak averaging
        return loss.detach()
    return step


def host_syncs(step, x, cond, device):
    """Run one step with CUDA sync debugging on; return the distinct synchronising call sites."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(x, cond)
            sync(device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sorted({f"{os.path.basename(w.filename)}:{w.lineno}" for w in caught
                   if "synchroniz" in str(w.message)})


def time_steps(step, x, cond, device, warmup, steps):
    """(seconds per step, compile/warm-up seconds, peak bytes, resident bytes before the steps)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        loss = step(x, cond)
    sync(device)
    t_warm = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step(x, cond)
    sync(device)
    dt = (time.perf_counter() - t0) / steps
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} after the timed steps")
    if device.type == "cuda":
        return dt, t_warm, torch.cuda.max_memory_allocated(device), resident
    return dt, t_warm, None, None


def time_parts(model, opt, ema, device, backward, reps=5):
    """Milliseconds of one Adam step (on the grads of one `backward()`) and of one EMA update alone."""
    backward()
    out = {}
    for name, fn in (("adam_ms", opt.step), ("ema_ms", lambda: semantica.update_ema(ema, model, 0.9999))):
        if name == "ema_ms" and ema is None:
            continue
        fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        out[name] = 1e3 * (time.perf_counter() - t0) / reps
    return out


def run_mode(args, mode, device, flops_img=None):
    """Build, optionally compile, time; return one result row (dict) and the FLOPs per image."""
    model, opt, ema, tokens = build(args, device)
    if flops_img is None:
        flops_img = count_flops(model.net.config, tokens)
    flops = flops_img * args.batch
    if mode == "compile":
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model.net.compile()  # in place, as train.py --compile
    bf16 = mode in ("bf16", "compile")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    gen = torch.Generator(device).manual_seed(0)
    step = make_step(model, opt, ema, autocast, gen)
    x, cond = make_batch(model, args.batch, tokens, device, args.channels_last)
    dt, t_warm, peak, resident = time_steps(step, x, cond, device, args.warmup, args.steps)
    row = dict(mode=mode + ("+cl" if args.channels_last else ""), preset=args.preset, batch=args.batch,
               step_ms=1e3 * dt, img_s=args.batch / dt, tflops=flops / dt / 1e12,
               gflop_per_img=flops / args.batch / 1e9, warmup_s=t_warm, ema=ema is not None,
               grad_checkpoint=args.grad_checkpoint)
    peak_tf = peak_tflops(device)
    row["mfu"] = row["tflops"] / peak_tf if peak_tf else None
    if peak is not None:
        row.update(peak_gib=peak / GiB, act_gib_per_img=(peak - resident) / args.batch / GiB,
                   resident_gib=resident / GiB)
    if args.sync_check and device.type == "cuda":
        row["host_syncs"] = host_syncs(step, x, cond, device)
    if mode == "compile":
        counters = torch._dynamo.utils.counters
        row["graph_breaks"] = sum(counters["graph_break"].values())
        row["graph_break_reasons"] = sorted(counters["graph_break"])[:5]
        row["unique_graphs"] = counters["stats"].get("unique_graphs")
    if args.parts:
        def backward():
            with autocast:
                model(x, cond, generator=gen).backward()
        row.update(time_parts(model, opt, ema, device, backward))
        dt_fb = dt - 1e-3 * (row["adam_ms"] + row.get("ema_ms", 0.0))  # what accumulation approaches
        row["mfu_fwd_bwd"] = flops / dt_fb / 1e12 / peak_tf if peak_tf and dt_fb > 0 else None
    model = opt = ema = step = x = cond = None  # drop the references before freeing memory
    free_memory(device)
    return row, flops_img


def find_max_batch(fits, cap):
    """Largest b in [1, cap] with fits(b), assuming monotonicity: double, then bisect. 0 if none."""
    good, bad = 0, None
    b = 1
    while b <= cap:
        if not fits(b):
            bad = b
            break
        good, b = b, 2 * b
    if bad is None:
        return good
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def max_batch_run(args, device):
    """semantica-512 on one card: the largest per-device batch, its step time, and the 8-card arithmetic."""
    mode = args.modes[0]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode in ("bf16", "compile"))
    model, opt, ema, tokens = build(args, device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.preset}: {n_params / 1e9:.3f} B parameters, grad_checkpoint {args.grad_checkpoint}", flush=True)
    flops = count_flops(model.net.config, tokens)
    if mode == "compile":
        model.net.compile()
    gen = torch.Generator(device).manual_seed(0)
    state, peaks = {"ema": ema}, {}

    def fits(b):
        step = make_step(model, opt, state["ema"], autocast, gen)
        ok = True
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            x, cond = make_batch(model, b, tokens, device, args.channels_last)
            for _ in range(2):  # the first step also allocates the Adam state
                step(x, cond)
            sync(device)
            if device.type == "cuda":
                peaks[b] = torch.cuda.max_memory_allocated(device)
        except torch.cuda.OutOfMemoryError:
            ok = False
        x = cond = step = None
        opt.zero_grad(set_to_none=True)
        free_memory(device)
        print(f"  batch {b}: {'fits' if ok else 'out of memory'}", flush=True)
        return ok

    best = find_max_batch(fits, args.max_batch_cap)
    if best == 0 and state["ema"] is not None:
        print("  batch 1 does not fit with the EMA on the card: retrying without it", flush=True)
        state["ema"] = ema = None
        peaks.clear()
        free_memory(device)
        best = find_max_batch(fits, args.max_batch_cap)
    result = dict(preset=args.preset, mode=mode, params_b=n_params / 1e9, max_batch=best,
                  max_batch_capped=best == args.max_batch_cap,
                  ema=state["ema"] is not None, grad_checkpoint=args.grad_checkpoint,
                  gflop_per_img=flops / 1e9)
    if best:
        args.batch = best
        step = make_step(model, opt, state["ema"], autocast, gen)
        x, cond = make_batch(model, best, tokens, device, args.channels_last)
        dt, t_warm, peak, resident = time_steps(step, x, cond, device, args.warmup, args.steps)
        peak_tf = peak_tflops(device)
        result.update(step_ms=1e3 * dt, img_s=best / dt, tflops=flops * best / dt / 1e12,
                      mfu=flops * best / dt / 1e12 / peak_tf if peak_tf else None)
        if peak is not None:
            result.update(peak_gib=peak / GiB, act_gib_per_img=(peak - resident) / best / GiB)
    if len(peaks) >= 2:  # marginal memory per image, smallest to largest batch that fit: the
        (b0, p0), (b1, p1) = min(peaks.items()), max(peaks.items())  # constants (state, grads) cancel
        result["act_gib_per_img"] = (p1 - p0) / (b1 - b0) / GiB
    card_gib = torch.cuda.get_device_properties(device).total_memory / GiB if device.type == "cuda" else None
    result.update(fsdp_arithmetic(model, result.get("act_gib_per_img"), result.get("img_s"), card_gib))
    return result


def fsdp_arithmetic(model, act_gib_per_img, img_s, card_gib, world=8):
    """Per-card memory, batch and step time of FSDP (full sharding, as train.py --fsdp) over `world` cards.

    State: fp32 params 4 + grads 4 + Adam m, v 8 + EMA 4 = 20 bytes per parameter, sharded / world.
    Unsharded while in use: the largest FSDP unit (train.py shards each ResBlock / TransformerBlock),
    fp32 params + grads, x2 for prefetching the next unit. Activations per image are the measured
    one-card figure (with checkpointing). Traffic per micro-step: all-gather in forward and backward
    + reduce-scatter of grads, 3 x 4 bytes x params x (world - 1) / world per card. The step time
    assumes perfect scaling and hidden communication, so it is a lower bound.
    """
    n_params = sum(p.numel() for p in model.parameters())
    unit = max(sum(p.numel() for p in m.parameters()) for m in model.net.modules()
               if isinstance(m, (uvit.ResBlock, uvit.TransformerBlock)))
    state, unit_gib = 20 * n_params / world / GiB, 2 * 8 * unit / GiB
    per_card = GLOBAL_BATCH // world
    out = dict(fsdp_world=world, state_gib_one_card=20 * n_params / GiB, fsdp_state_gib_per_card=state,
               fsdp_unit_gib=unit_gib, fsdp_images_per_card_per_step=per_card,
               fsdp_comm_gb_per_micro_step=3 * 4 * n_params * (world - 1) / world / 1e9)
    if act_gib_per_img and card_gib:
        micro = int((0.95 * card_gib - state - unit_gib) / act_gib_per_img)  # DESIGN: 5 % headroom
        out.update(fsdp_micro_batch=min(micro, per_card), fsdp_accumulation=-(-per_card // max(micro, 1)))
    if img_s:
        out["fsdp_step_s_lower_bound"] = per_card / img_s
    return out


def fmt(row):
    keys = ["mode", "batch", "step_ms", "img_s", "tflops", "mfu", "mfu_fwd_bwd", "gflop_per_img", "peak_gib",
            "act_gib_per_img", "warmup_s", "adam_ms", "ema_ms"]
    parts = []
    for k in keys:
        v = row.get(k)
        if k in row:
            parts.append(f"{k}={'n/a' if v is None else (f'{v:.3g}' if isinstance(v, float) else v)}")
    return "  ".join(parts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=None, choices=sorted(uvit.PRESETS),
                   help="default: sid-b-256 on CUDA, tiny-32 on CPU")
    p.add_argument("--encoder", default=None, help="token shape source; default per preset (DEFAULT_ENCODER)")
    p.add_argument("--batch", type=int, default=None, help="per-device batch; default 16 CUDA, 8 CPU")
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--modes", default="eager,bf16,compile", help="comma list of eager, bf16, compile")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute block activations in backward")
    p.add_argument("--no-ema", action="store_true", help="leave the EMA update out of the step")
    p.add_argument("--parts", action="store_true", help="also time Adam and the EMA update alone")
    p.add_argument("--sync-check", action="store_true", help="list host syncs in one step (CUDA)")
    p.add_argument("--find-max-batch", action="store_true", help="largest batch that fits, then time it")
    p.add_argument("--max-batch-cap", type=int, default=256)
    p.add_argument("--json", default=None, help="append result rows (JSON lines) to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.preset = args.preset or ("sid-b-256" if device.type == "cuda" else "tiny-32")
    args.encoder = args.encoder or DEFAULT_ENCODER.get(args.preset, "dinov2-b14")
    args.batch = args.batch or (16 if device.type == "cuda" else 8)  # DESIGN: eager fp32 needs ~5 GiB/img (est.)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in ("eager", "bf16", "compile")]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from eager, bf16, compile")
    return args, device


def main(argv=None):
    args, device = parse_args(argv)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as train.py
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # DESIGN: fixed shapes, so let cuDNN pick conv kernels
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    peak = peak_tflops(device)
    print(f"device {name}; bf16 peak {peak or 'n/a'} TFLOP/s; torch {torch.__version__}; preset {args.preset}; "
          f"tokens from {args.encoder}: {token_shape(args.encoder)}", flush=True)
    rows = []
    if args.find_max_batch:
        rows.append(max_batch_run(args, device))
        print(json.dumps(rows[-1], indent=1), flush=True)
    else:
        flops, batch = None, args.batch
        for mode in args.modes:
            args.batch = batch
            while True:
                try:
                    row, flops = run_mode(args, mode, device, flops)
                except torch.cuda.OutOfMemoryError:  # retry at half the batch
                    row = None
                except Exception as e:  # one failing mode (e.g. a compile error) must not lose the others
                    row = dict(mode=mode, preset=args.preset, batch=args.batch,
                               error=f"{type(e).__name__}: {e}"[:2000])
                free_memory(device)
                if row is not None or args.batch == 1:
                    break
                print(f"mode={mode} batch {args.batch}: out of memory, retrying at {args.batch // 2}", flush=True)
                args.batch //= 2
            if row is None:
                row = dict(mode=mode, preset=args.preset, batch=1, error="out of memory at batch 1")
            row["device"] = name
            rows.append(row)
            print(fmt(row) if "error" not in row else f"mode={mode} FAILED {row['error']}", flush=True)
            extra = {k: row[k] for k in ("host_syncs", "graph_breaks", "graph_break_reasons", "unique_graphs")
                     if k in row}
            if extra:
                print("   ", json.dumps(extra), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps({**row, "device": name, "torch": torch.__version__}) + "\n")
    return rows


if __name__ == "__main__":
    main()
