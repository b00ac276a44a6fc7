"""The claims experiment's definition, shared by its pipeline (claims.py) and its report (claims_report.py).

Semantica (arXiv 2405.14857) at small scale: the presets of a run (ClaimsConfig: the CPU run, its smoke test,
the GPU profile), the four training settings of §4, §5, App. C and App. D, the test pages' seed, the ablation
guidance (§6.1), the pair-filter band (§5, App. C), the criteria fixed before a run, the command
line that reproduces a run, and how the samples that sample.py writes are read back. No computation here.
"""
import os
import shlex
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import diffusion  # noqa: E402

TEST_PAGES_SEED = 303       # DESIGN: test pages: their own seed, never trained on (as ImageNet val, §8.2)
# DESIGN: --data: a training image is a copy of a test image (and left out of training) when the two, as the
# model sees them (centre crop resized to `size`), differ by an RMSE below this on the [-1, 1] scale (~1.3
# grey levels): byte copies, lossless re-encodings and lightly recompressed copies (a JPEG q75 re-save: 0.008
# on average). Measured on 269 real images of 38 folders: the closest two different pictures were 0.020 apart
# (two Adwaita icons), the closest copies 0.000-0.007 (one figure saved twice, a palette-compressed PNG).
TEST_COPY_RMSE = 0.01
W_ABLATION = diffusion.GUIDANCE   # §6.1: "0.5 guidance for our ablations"
# §5, App. C: low 0.3 as for DINOv2. INTERPRETATION: the paper set 0.9 "to filter out near duplicates" by
# looking at DINOv2-B pairs; with our encoder (the job's, pages/toy_encoder.py) the same procedure gives 0.995.
# Same-page pairs of the 2 048 training pages by the encoder's CLS cosine: of 16 962 pairs of two genuine page
# images, 62 % sit above 0.9, 0.1 % above 0.995 and none below 0.3; of the 1 821 pairs with a near duplicate
# (page image 0 relit), 22 % sit above 0.995 (the duplicate with its source); of the 5 548 pairs with an
# unrelated outlier, 56 % sit below 0.3.
FILTER = (0.3, 0.995)


@dataclass(frozen=True)
class ClaimsConfig:
    preset: str = "full"
    model: str = "tiny-32-p2"        # uvit.PRESETS; the default job's 32 px model (train.py --res 32)
    size: int = 32                   # image side of every page, sample and metric input (the model's)
    train_pages: int = 2048          # synthetic training pages (train.py's synthetic source)
    steps: int = 1500                # DEVIATION: 1/200 of §6.1's 300K steps (CPU budget: a seed in <= 45 min)
    batch: int = 32                  # DEVIATION: §6.1 uses 2048
    lr: float = 1e-3                 # as train.py --res 32: short-run learning rate
    ema_decay: float = 0.99          # DEVIATION: §6.1 uses 0.9999; a 100-step window suits a short run (the job's)
    test_pages: int = 20             # K conditioning images (one per page), §8.2: one per class
    per_page: int = 10               # N/K test images per page, §8.2: ten per class
    sample_steps: int = 32           # DESIGN: DDPM steps (paper: not stated); few, for the CPU budget
    sample_batch: int = 100          # DESIGN: samples per sampling call (fastest on 2 CPU cores)
    # Fig. 3 sweep. INTERPRETATION: Fig. 3 does not print its w; Semantica's own guidance tables and figures
    # span 0.0-1.5 (App. H Tab. 4, App. I Tab. 6, App. J Fig. 15); 0.5 = §6.1's ablation setting
    guidances: tuple = (0.0, 0.5, 1.0, 1.5)
    feature_steps: int = 500         # features.train_feature_net
    bank_pages: int = 600            # held-out pages of the feature network
    bootstrap: int = 50              # resamples for the FID noise estimate
    num_workers: int = 0             # train.py DataLoader workers (rendering pages; GPU profile: 8)
    classifier_steps: int = 800      # kinds.train_classifier (object-kind classifier, >= 90 % held out)
    classifier_pages: int = 3000     # its held-out training pages (and 1/3 as many to measure it)
    seed: int = 0                    # test pages' split, sampling, bootstrap, the encoder and metric networks
    train_seed: int = 0              # train.py --seed of the four denoisers: their training pages' draw, init,
    #   data order, t and eps (--train-seeds: training variance, which the bootstrap sigma does not contain)


PRESETS = {
    "full": ClaimsConfig(),
    # Smoke test of every code path (CI): tiny everything, numbers meaningless.
    "quick": ClaimsConfig(preset="quick", train_pages=64, steps=12, batch=8, test_pages=4, per_page=5,
                          sample_steps=6, guidances=(0.0, 0.5, 1.5), feature_steps=6,
                          bank_pages=40, bootstrap=5, classifier_steps=6,
                          classifier_pages=30),
    # DESIGN: the same claims at 64 px (small-64, 10.2M) on one H100/H200 in <= 8 min, with 6.7x the training
    # images of "full" (2500 x 128 = 320K vs 1500 x 32 = 48K seen) and 20x its pages (40 960 vs 2 048).
    # Metric features, classifier and encoder stay the 32 px networks (inputs downsampled, DESIGN).
    "gpu": ClaimsConfig(preset="gpu", model="small-64", size=64, train_pages=40960, steps=2500, batch=128,
                        lr=5e-4, ema_decay=0.999, test_pages=50, per_page=10, sample_steps=64, sample_batch=500,
                        num_workers=8),
    # The gpu profile's code path on a CPU in a minute (tests/test_claims.py): numbers meaningless.
    "gpu-quick": ClaimsConfig(preset="gpu-quick", model="small-64", size=64, train_pages=32, steps=4, batch=4,
                              test_pages=3, per_page=4, sample_steps=3, guidances=(0.0, 1.5),
                              feature_steps=4, bank_pages=24, bootstrap=3, classifier_steps=4,
                              classifier_pages=30),
}

SETTINGS = {  # name -> train.py flags (App. D compares both conditionings with filtering)
    "reconstruction": dict(pairs="same", conditioning="cross_attention", filter=False),      # Eq. 2
    "pages+filter": dict(pairs="page", conditioning="cross_attention", filter=True),         # Eq. 3
    "pages": dict(pairs="page", conditioning="cross_attention", filter=False),
    "pages+filter FiLM": dict(pairs="page", conditioning="film", filter=True),
}
SWEEP = "pages+filter"      # the model of the guidance sweep (Fig. 3)

# Criteria, fixed before the run (DESIGN: the paper states its claims without thresholds):
NOISE_SIGMAS = 2.0    # a difference counts when it is beyond 2 sigma of its noise (bootstrap / binomial)
COPY_RATIO = 0.5      # claim 1: reconstruction RMSE to the condition < half the page model's (at w = 0)
RECALL_DROP = 0.1     # claim 2: one-shot recall falls by >= 0.1 from w = 0 to the largest w


def steps_suffix(cc):
    """'' when cc trains its preset's number of steps, else '-steps<N>' (the work folder's and report's suffix)."""
    return "" if cc.steps == PRESETS[cc.preset].steps else f"-steps{cc.steps}"


def default_command(cc, data_arg, seeds=(0,), out=None, results=None):
    """The claims.py command line of a run: preset, training length, data, work folder and training seeds."""
    q = lambda v: shlex.quote(str(v))                    # noqa: E731 (a path with spaces stays one argument)
    flags = [f for f, on in (("--quick", "quick" in cc.preset), ("--profile gpu", cc.preset.startswith("gpu")),
                             (f"--steps {cc.steps}", steps_suffix(cc)),
                             (f"--data {q(data_arg)}", data_arg != "synthetic"), (f"--out {q(out)}", out),
                             (f"--results {q(results)}", results),
                             ("--train-seeds " + ",".join(map(str, seeds)), list(seeds) != [0])) if on]
    return " ".join(["python experiments/claims.py"] + flags)


def load_samples(out, w, size):
    """-> (images (N,3,S,S) in [-1,1], cond index per sample (N,)), read back from the PNGs that
    sample.few_shot writes as OUT/samples_w{w}/cond{index}_{sample}.png."""
    folder = os.path.join(out, f"samples_w{w}")
    files = sorted(f for f in os.listdir(folder) if f.startswith("cond") and f.endswith(".png"))
    if not files:
        raise FileNotFoundError(f"{folder}: no samples written by sample.few_shot")
    cond = torch.tensor([int(f[4:].split("_")[0]) for f in files])
    return torch.stack([data.load_image(os.path.join(folder, f), size) for f in files]), cond
