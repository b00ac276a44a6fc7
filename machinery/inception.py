"""The standard FID feature network: Inception-v3 pool3 (2048-d), TF-FID variant, from scratch.

What: the paper reports FID (Heusel et al., 2017) throughout: Table 1 and "FID on 50000 ImageNet
samples" (§6 ablation setup), the few-shot FID of §7, Fig. 4 (one-shot ImageNet, §8), Table 2
(label-grouped baseline, §8.3), App. H (FID vs guidance, Tables 3-6). It never says which
implementation it uses. # INTERPRETATION: the usual one,
the TensorFlow Inception graph `inception-2015-12-05` of the original FID code (TTUR), here in
its PyTorch port used by pytorch-fid and clean-fid, so our numbers sit on the same scale as
published FIDs. Its weights file is `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's
release); `load_inception(path)` loads it strictly from a local path (nothing is downloaded).

The TF graph differs from torchvision's Inception-v3 in three places, all reproduced here:
  1. every average pool inside the A, C and E blocks ignores the zero padding
     (`count_include_pad=False`, TF's "SAME" average pooling);
  2. the LAST E block (Mixed_7c) uses a 3x3 MAX pool in its pool branch, where the first E block
     (Mixed_7b) and torchvision's Inception use an average pool (a quirk of the TF graph, kept so
     the weights mean what they were trained for). The issue text says "first E block": pytorch-fid's
     `FIDInceptionE_2` (the second, Mixed_7c) is the one with the max pool;
  3. the graph's 1008-way classifier (`fc`); loaded for strictness but unused: features are pool3.
Input handling follows pytorch-fid's `InceptionV3`: bilinear resize to 299x299 with
`align_corners=False` and no antialiasing, on images in [-1, 1]. pytorch-fid takes [0, 1] and
applies 2x-1 after resizing; resizing is affine-equivariant, so taking [-1, 1] directly is the
same map (to float rounding). # DEVIATION vs clean-fid: clean-fid resizes with antialiased PIL
bicubic before the network, so its FIDs differ from pytorch-fid's on resized images; we follow
pytorch-fid because its resize runs batched on tensors, on the GPU.

Precision ("bf16-safe"): features are always computed in float32, whatever the input dtype or an
enclosing (bf16) autocast context, and on CUDA with cuDNN's TF32 switched off for the call
(`cuda_tf32 = False`). Measured on an H200 against pytorch-fid's CPU goldens (random weights,
features up to ~19): float32 max error 1.1e-5 at ~2200 images/s; TF32 1.2e-2 at ~4150 images/s.

Left out: the aux classifier, torchvision's (non-FID) Inception weights, the 64/192/768-d
intermediate feature blocks, clean-fid's PIL resize, reading image folders (metrics.py does that).
"""
import os
import pickle

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's release asset
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")          # where users get it (pytorch-fid 0.3.0)
INPUT_SIZE = 299    # TF graph input size; pytorch-fid resizes every image to it
FEATURE_DIM = 2048  # pool3
NUM_CLASSES = 1008  # the TF graph's classifier width (pytorch-fid: num_classes=1008)
BN_EPS = 1e-3       # TF's batch-norm epsilon, as in the ported weights


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, running stats from the file) -> ReLU."""

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_same(x):
    """TF 'SAME' 3x3/1 average pool: padded zeros are not counted (FID quirk 1)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/c/d (35x35): 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool->1x1."""

    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_same(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Mixed_6a, grid reduction 35 -> 17: 3x3/2 | 1x1->3x3->3x3/2 | maxpool/2."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """Mixed_6b..6e (17x17), factorised 7x7: 1x1 | 1x7,7x1 | 7x1,1x7,7x1,1x7 | avgpool->1x1."""

    def __init__(self, c_in, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        bp = self.branch_pool(_avg_pool_same(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """Mixed_7a, grid reduction 17 -> 8: 1x1->3x3/2 | 1x1->1x7->7x1->3x3/2 | maxpool/2."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b/7c (8x8), expanded: 1x1 | 1x1->(1x3, 3x1) | 1x1->3x3->(1x3, 3x1) | pool->1x1.

    `pool="max"` for Mixed_7c only (FID quirk 2); Mixed_7b uses the padding-free average pool."""

    def __init__(self, c_in, pool):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)  # FID quirk 2 (Mixed_7c)
        else:
            pooled = _avg_pool_same(x)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class InceptionV3FID(nn.Module):
    """images (B, 3, H, W) in [-1, 1], any H, W -> pool3 features (B, 2048) float32.

    Module and parameter names are those of the weights file (torchvision's Inception3 names), so
    `load_state_dict` on `pt_inception-2015-12-05-6726825d.pth` is strict. Always in eval mode:
    batch norm must use the file's running statistics, so `.train()` is a no-op."""

    name = "inception-v3-fid"
    dim = FEATURE_DIM
    image_size = INPUT_SIZE
    # DESIGN: cuDNN convs on Ampere+ GPUs default to TF32 (10-bit mantissa), which moved features
    # by up to 1.2e-2 on an H200 (float32: 1.1e-5); FID features stay float32 unless set True.
    cuda_tf32 = False

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)     # 299 -> 149
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)               # -> 147
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)    # -> 147, then maxpool -> 73
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)              # -> 71, then maxpool -> 35
        self.Mixed_5b = InceptionA(192, pool_features=32)         # -> 256 channels
        self.Mixed_5c = InceptionA(256, pool_features=64)         # -> 288
        self.Mixed_5d = InceptionA(288, pool_features=64)         # -> 288
        self.Mixed_6a = InceptionB(288)                           # -> 768, 17x17
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)                           # -> 1280, 8x8
        self.Mixed_7b = InceptionE(1280, pool="avg")              # -> 2048
        self.Mixed_7c = InceptionE(2048, pool="max")              # -> 2048 (FID quirk 2)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)             # unused; kept for strict loading
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)  # DESIGN: frozen feature network, BN never in batch mode

    def forward(self, images):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"InceptionV3FID expects images (B, 3, H, W), got {tuple(images.shape)}")
        x = images.float()
        if x.numel() and (x.min() < -1.001 or x.max() > 1.001):
            raise ValueError(f"InceptionV3FID expects images in [-1, 1], got values in "
                             f"[{x.min().item():.3g}, {x.max().item():.3g}] (pytorch-fid's [0, 1] "
                             f"input maps to ours by 2x-1; uint8 by x/127.5-1)")
        if x.is_cuda and not self.cuda_tf32:  # full float32 convs for this call, flag restored after
            prev = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = False
            try:
                return self._pool3(x)
            finally:
                torch.backends.cudnn.allow_tf32 = prev
        return self._pool3(x)

    def _pool3(self, x):
        with torch.autocast(x.device.type, enabled=False):  # float32 features even under bf16 autocast
            x = preprocess(x)
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = F.max_pool2d(x, kernel_size=3, stride=2)
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
            x = F.max_pool2d(x, kernel_size=3, stride=2)
            for block in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
                x = getattr(self, f"Mixed_{block}")(x)
            return x.mean(dim=(2, 3))  # pool3: global average over the 8x8 grid


def preprocess(images):
    """pytorch-fid's input resize: bilinear to 299x299, align_corners=False, no antialiasing;
    (B, 3, H, W) -> (B, 3, 299, 299). A 299x299 input is returned as is (the identity)."""
    if images.shape[-2:] == (INPUT_SIZE, INPUT_SIZE):
        return images
    return F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)


def strip_prefixes(key):
    """encoders.strip_prefixes, the one key rule of every file the project reads, repeated (this module imports
    no project module: scripts/make_inception_goldens.py runs in a venv without einops): "module." /
    "_orig_mod." prefixes of a wrapped or compiled model, in any order and number, are removed."""
    while key.startswith(("module.", "_orig_mod.")):
        key = key.split(".", 1)[1]
    return key


def load_inception(path, map_location="cpu"):
    """Build `InceptionV3FID` from a local `pt_inception-2015-12-05-6726825d.pth`, strictly.

    Raises FileNotFoundError / ValueError naming the file and the mismatch (missing, unexpected
    or mis-shaped keys) for anything that is not that network's state dict. The only tolerated
    difference is absent BatchNorm `num_batches_tracked` counters (an older-PyTorch state dict;
    the counter has no effect in eval mode, and PyTorch itself accepts such files); "module." / "_orig_mod."
    key prefixes are stripped (strip_prefixes)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights not found: {path} (get pytorch-fid's {WEIGHTS_FILE} "
                                f"from {WEIGHTS_URL}; nothing is downloaded automatically)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        # encoders.load_failure's reasons, repeated: this module imports no project module, so that
        # scripts/make_inception_goldens.py runs in a venv without einops
        why = ("not a torch file of tensors and plain containers" if isinstance(e, pickle.UnpicklingError)
               else f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
        raise ValueError(f"{path}: not a readable PyTorch weights file ({why})") from e
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors ({WEIGHTS_FILE}), got "
                         f"{type(state).__name__} with keys {list(state)[:5] if isinstance(state, dict) else ''}")
    state = {strip_prefixes(k): v for k, v in state.items()}
    net = InceptionV3FID()
    expected = net.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{path} is not the FID Inception-v3 weights file ({WEIGHTS_FILE}): "
            f"{len(missing)} missing keys {missing[:4]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:4]}, {len(shapes)} shape mismatches {shapes[:3]}. (torchvision's "
            f"inception_v3 weights have AuxLogits and a 1000-way fc and are NOT the FID network.)")
    state = dict(state)
    for k in expected:
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = expected[k]
    net.load_state_dict(state, strict=True)
    return net


def random_inception(seed=0):
    """InceptionV3FID with random_state_dict(seed): smoke tests only (its features mean nothing)."""
    net = InceptionV3FID()
    net.load_state_dict(random_state_dict(seed), strict=True)
    return net


def random_state_dict(seed=0):
    """A random state dict in the weights file's exact key layout (tests; no weights download here).

    Uses numpy's legacy `RandomState`, whose stream is frozen across numpy versions, so the same seed
    gives the same weights under any torch/numpy (the golden script and CI rely on it). Scales keep
    activations O(1): He-normal convs, BN gamma ~ U(0.8, 1.2), beta ~ N(0, 0.1^2), running mean
    ~ N(0, 0.1^2), running var ~ U(0.5, 1.5)."""
    rng = np.random.RandomState(seed)
    out = {}
    for k, v in InceptionV3FID().state_dict().items():
        shape = tuple(v.shape)
        if k.endswith("conv.weight"):
            a = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        elif k.endswith("bn.weight"):
            a = rng.uniform(0.8, 1.2, shape)
        elif k.endswith("bn.bias") or k.endswith("running_mean"):
            a = rng.standard_normal(shape) * 0.1
        elif k.endswith("running_var"):
            a = rng.uniform(0.5, 1.5, shape)
        elif k.endswith("num_batches_tracked"):
            out[k] = torch.zeros((), dtype=torch.long)
            continue
        elif k.startswith("fc."):
            a = rng.standard_normal(shape) * np.sqrt(1.0 / FEATURE_DIM)
        else:
            raise KeyError(f"random_state_dict: no rule for {k}")
        out[k] = torch.from_numpy(a.astype(np.float32))
    return out
