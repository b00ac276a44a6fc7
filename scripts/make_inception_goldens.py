"""Golden pool3 features for tests/test_inception.py, from pytorch-fid (an independent implementation).

No FID weights can be downloaded here, so both sides use the same RANDOM weights:
`inception.random_state_dict(SEED)` (numpy's frozen legacy RandomState stream, in the weights
file's key layout) is saved to a temporary .pth outside the repo and loaded by pytorch-fid's own
`fid_inception_v3()` through its own strict `load_state_dict` (we only replace its URL download by
reading that file). That strict load is itself an independent check of our key names and shapes.
pytorch-fid's `InceptionV3([3])` (its resize + 2x-1 scaling + FID blocks) then maps the test images
(given to it in [0, 1]) to 2048-d features. Only the small inputs (uint8) and outputs are stored
(tests/data/inception/goldens.npz, < 1 MB); CI rebuilds the weights from SEED.

Produced with: pytorch-fid 0.3.0, torch 2.14.1, torchvision 0.29.1, numpy 2.4.6, Python 3.11, CPU.
Run it in a throwaway virtualenv OUTSIDE the repo (pytorch-fid needs torchvision, which the
project does not use):
    python -m venv /tmp/venv_fid
    /tmp/venv_fid/bin/pip install torch==2.14.1 torchvision==0.29.1 pytorch-fid==0.3.0
    /tmp/venv_fid/bin/python scripts/make_inception_goldens.py
"""
import os
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from machinery import inception  # noqa: E402  (ours: only for random_state_dict and the cross-check print)

SEED = 0            # weights seed, read back by the test
IMAGE_SEED = 1234   # test images
OUT = os.path.join(ROOT, "tests", "data", "inception", "goldens.npz")
# Sizes: 64x64 (upsampled, the project's training size), 299 (no resize), non-square 100x150,
# and 320x320 (downsampled: bilinear without antialiasing, as pytorch-fid). The 320 image is
# random 8x8-pixel blocks so that it compresses and the file stays small.
SIZES = {"64": (4, 64, 64), "299": (1, 299, 299), "100x150": (1, 100, 150), "320": (1, 320, 320)}
BLOCK = {"320": 8}


def weights_fingerprint(state):
    """sum |w| over all float tensors, float64: lets the test tell 'weights differ' from 'model differs'."""
    return float(sum(v.double().abs().sum() for v in state.values() if v.is_floating_point()))


def main():
    import pytorch_fid
    import pytorch_fid.inception as pfi
    import torchvision

    state = inception.random_state_dict(SEED)
    with tempfile.TemporaryDirectory() as tmp:  # the ~95 MB file never enters the repo
        path = os.path.join(tmp, inception.WEIGHTS_FILE)
        torch.save(state, path)
        # pytorch-fid downloads FID_WEIGHTS_URL; hand it our local file instead, then let its own
        # strict load_state_dict run.
        pfi.load_state_dict_from_url = lambda url, progress=True: torch.load(path, weights_only=True)
        theirs = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
        ours = inception.load_inception(path)

    rng = np.random.RandomState(IMAGE_SEED)
    arrays = {"seed": np.int64(SEED), "weights_fingerprint": np.float64(weights_fingerprint(state)),
              "versions": np.array(f"pytorch-fid {pytorch_fid.__version__}, torch {torch.__version__}, "
                                   f"torchvision {torchvision.__version__}, numpy {np.__version__}")}
    for name, (n, h, w) in SIZES.items():
        b = BLOCK.get(name, 1)
        u8 = rng.randint(0, 256, size=(n, 3, h // b, w // b)).astype(np.uint8)
        u8 = u8.repeat(b, axis=2).repeat(b, axis=3)
        with torch.no_grad():
            x01 = torch.from_numpy(u8).float() / 255.0                  # pytorch-fid's input range
            feats = theirs(x01)[0].squeeze(-1).squeeze(-1).numpy()      # (n, 2048, 1, 1) -> (n, 2048)
            mine = ours(torch.from_numpy(u8).float() / 127.5 - 1.0).numpy()
        print(f"{name}: features {feats.shape}, mean {feats.mean():.4f}, max {feats.max():.3f}, "
              f"max |ours - pytorch-fid| = {np.abs(mine - feats).max():.2e}")
        arrays[f"images_{name}"] = u8
        arrays[f"features_{name}"] = feats.astype(np.float32)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({os.path.getsize(OUT) / 1e3:.0f} kB); {arrays['versions']}")


if __name__ == "__main__":
    main()
