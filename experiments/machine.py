"""The machine a result was measured on, in one line (experiments/claims.py and sweep.py write it beside
their wall times). Speed and, through float rounding, the trained models themselves depend on it: the same
claims run gave different models on an AVX2 and an AVX-512 CPU (experiments/STUDY.md, the claims' part)."""
import os
import platform

import torch


def describe():
    """'[GPU + ]CPU model, N cores, AVX-512[ + bf16] | no AVX-512, torch X, T thread(s)' (Linux reads
    /proc/cpuinfo; elsewhere platform.processor() and no SIMD flags)."""
    flags, model = set(), platform.processor() or "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    simd = "AVX-512" + (" + bf16" if "avx512_bf16" in flags else "") if "avx512f" in flags else "no AVX-512"
    gpu = torch.cuda.get_device_name() + " + " if torch.cuda.is_available() else ""
    return (f"{gpu}{model}, {os.cpu_count()} cores, {simd}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s)")
