"""Benchmark metrics.py against the naive approaches, in the same run: wall time and peak memory.

    python bench/metrics.py                      # N = 10k and 50k, D = 2048, CPU
    python bench/metrics.py --n 10000 --device cuda
    python bench/metrics.py --n 10000 --metrics fid    # only FID (or: --metrics pr)

FID: ours (row-blocked float64 covariance in torch, Cholesky + eigvalsh trace term) vs the standard
path (np.cov + pytorch-fid's scipy.linalg.sqrtm(Σ₁Σ₂)). Precision/recall (k = 3): ours (metrics_fast:
bf16 GEMM tiles where bf16 is measured faster, else float32, each distance an interval under a
per-pair error bound, radii as intervals, undecided pairs and the radii they need recomputed exactly)
vs one full N×N distance matrix per pair of sets
(torch.cdist + kthvalue, torch-fidelity's save_cpu_ram=False), which holds a 4N²-byte float32
matrix (10 GB at N = 50k); above --naive-max-n it is not run and its figures are extrapolated
from the largest measured N (time and memory ∝ N²; without one, memory = 5N² bytes: a float32
M×N matrix and a bool mask), marked "est.".

Every case runs in a fresh subprocess. Peak memory = peak RSS (VmHWM, reset via /proc/self/clear_refs
after the features are built) minus the RSS with the features resident; on CUDA,
torch.cuda.max_memory_allocated above the features. Features: float32, x = z (I + W/√D), z ~ N(0, I);
fake = 1.1·x' + 0.05 for an independent x'.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)          # this file is also called metrics.py: import the project's module

import numpy as np
import scipy.linalg
import torch

import metrics


def make_features(n, d, device, seed):
    """Float32 features built in row blocks, so the peak while building ≈ the final size."""
    g = torch.Generator(device=device).manual_seed(seed)
    mix = torch.eye(d, device=device) + torch.randn(d, d, generator=g, device=device) / d ** 0.5
    x = torch.empty(n, d, device=device)
    for i in range(0, n, 4096):
        x[i:i + 4096] = torch.randn(min(4096, n - i), d, generator=g, device=device) @ mix
    return x


def rss_mb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field))


class Meter:
    """Wall time and peak memory above the current level (CPU: RSS; CUDA: allocator)."""

    def __init__(self, device):
        self.cuda = device.startswith("cuda")
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2 ** 20
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                                     # reset VmHWM to the current RSS
            self.base = rss_mb("VmRSS")
        self.t0 = time.perf_counter()

    def lap(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - self.t0

    def peak_mb(self):
        peak = torch.cuda.max_memory_allocated() / 2 ** 20 if self.cuda else rss_mb("VmHWM")
        return peak - self.base


def sqrtm_fid(mu1, sigma1, mu2, sigma2):
    """pytorch-fid 0.3.0 calculate_frechet_distance (sqrtm, eps retry, imaginary-part check)."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def full_matrix_pr(real, fake, k):
    """One full N×N (or M×N) distance matrix at a time: torch.cdist, kthvalue(k + 1), ≤."""
    r_real = torch.cdist(real, real).kthvalue(k + 1, dim=1).values
    r_fake = torch.cdist(fake, fake).kthvalue(k + 1, dim=1).values
    d = torch.cdist(fake, real)                                   # (M, N)
    return (d <= r_real[None]).any(1).double().mean().item(), (d <= r_fake[:, None]).any(0).double().mean().item()


def run_case(case, n, d, device):
    real, fake = make_features(n, d, device, 0), 1.1 * make_features(n, d, device, 1) + 0.05
    m = Meter(device)
    if case == "fid_ours":
        stats = metrics.feature_stats(real) + metrics.feature_stats(fake)
        t_stats = m.lap()
        value = metrics.fid_from_stats(*stats)
    elif case == "fid_sqrtm":
        r, f = real.cpu().numpy(), fake.cpu().numpy()
        stats = (r.mean(0, dtype=np.float64), np.cov(r, rowvar=False), f.mean(0, dtype=np.float64),
                 np.cov(f, rowvar=False))
        t_stats = m.lap()
        value = sqrtm_fid(*stats)
    elif case == "pr_ours":
        value, t_stats = tuple(metrics.precision_recall(real, fake)), 0.0
    elif case == "pr_full":
        value, t_stats = full_matrix_pr(real, fake, metrics.K_NN), 0.0
    total = m.lap()
    return {"case": case, "n": n, "d": d, "total_s": total, "stats_s": t_stats,
            "distance_s": total - t_stats, "peak_mb": m.peak_mb(), "value": value}


def spawn(case, n, d, device):
    cmd = [sys.executable, __file__, "--case", case, "--n", str(n), "--d", str(d), "--device", device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{case} at N={n} failed:\n{out.stderr[-2000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(res), file=sys.stderr)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[10000, 50000])
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--naive-max-n", type=int, default=None,
                    help="largest N for the full-matrix P/R (default 10000 on CPU, 50000 on CUDA)")
    ap.add_argument("--metrics", nargs="+", default=["fid", "pr"], choices=["fid", "pr"])
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.n[0], args.d, args.device)))
        return
    naive_max = args.naive_max_n or (50000 if args.device.startswith("cuda") else 10000)
    rows, measured_full = [], None
    for n in args.n:
        if "fid" in args.metrics:
            ours, sq = spawn("fid_ours", n, args.d, args.device), spawn("fid_sqrtm", n, args.d, args.device)
            rows.append(f"| FID | {n} | {ours['stats_s']:.1f} + {ours['distance_s']:.2f} = {ours['total_s']:.1f} s "
                        f"| {ours['peak_mb']:.0f} MB | {sq['stats_s']:.1f} + {sq['distance_s']:.2f} = "
                        f"{sq['total_s']:.1f} s | {sq['peak_mb']:.0f} MB | distance "
                        f"{sq['distance_s'] / ours['distance_s']:.1f}×, total {sq['total_s'] / ours['total_s']:.1f}× "
                        f"| {ours['value']:.6f} vs {sq['value']:.6f} |")
        if "pr" not in args.metrics:
            continue
        ours = spawn("pr_ours", n, args.d, args.device)
        if n <= naive_max:
            full = measured_full = spawn("pr_full", n, args.d, args.device)
            full_time, full_mem, est = full["total_s"], full["peak_mb"], ""
            check = "identical" if full["value"] == ours["value"] else f"DIFFER {full['value']}"
        elif measured_full:
            scale = (n / measured_full["n"]) ** 2
            full_time, full_mem = measured_full["total_s"] * scale, measured_full["peak_mb"] * scale
            est, check = " (est.)", "-"
        else:
            full_time, full_mem, est, check = float("nan"), 5 * n * n / 2 ** 20, " (est.)", "-"
        rows.append(f"| P/R | {n} | {ours['total_s']:.1f} s | {ours['peak_mb']:.0f} MB | {full_time:.1f} s{est} "
                    f"| {full_mem:.0f} MB{est} | {full_time / ours['total_s']:.1f}× | P, R = "
                    f"{ours['value'][0]:.4f}, {ours['value'][1]:.4f} ({check}) |")
    print(f"device: {args.device}, D = {args.d}, torch threads: {torch.get_num_threads()}")
    print("| metric | N | ours: time | ours: peak mem | naive: time | naive: peak mem | speed-up | values |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
