"""What bench/train_step.py and bench/sample.py share: the workload they time and the device facts they
report against. A library module (no main): the benchmark scripts import it, never each other.

- DEFAULT_ENCODER / token_shape: which encoder's tokens each U-ViT preset is conditioned on, and their
  shape (T_c, D), without building the encoder's weights (the benchmarks feed precomputed tokens, §3.2).
- BF16_PEAK_TFLOPS / peak_tflops: the card's dense bf16 peak, the denominator of MFU.
- sync / free_memory: device synchronisation for timing, and releasing cached memory between runs.
"""
import gc

import torch

import encoders

# Dense bf16 tensor-core peak, TFLOP/s (NVIDIA datasheets, without sparsity). Matched in order on
# torch.cuda.get_device_name(): "NVIDIA H100 80GB HBM3" is the SXM part, "NVIDIA H100 PCIe" the PCIe.
BF16_PEAK_TFLOPS = [("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),
                    ("A100", 312.0)]
# Which encoder's tokens each preset is conditioned on (uvit.PRESETS comments, train.py's resolution presets).
DEFAULT_ENCODER = {"tiny-32": "tiny", "small-64": "tiny", "sid-b-256": "dinov2-b14",
                   "sid-l-256": "dinov2-l14", "semantica-512": "dinov2-l14"}


def token_shape(encoder_name):
    """(T_c, cond_dim) of the encoder's tokens at its eval size, without building its weights."""
    with torch.device("meta"):
        enc = encoders.VisionEncoder(encoders.ENCODER_PRESETS[encoder_name], encoder_name)
    return enc.num_tokens, enc.dim


def peak_tflops(device):
    """Dense bf16 peak of the card, or None (CPU, unknown card): MFU is then not reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((p for key, p in BF16_PEAK_TFLOPS if key in name), None)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
