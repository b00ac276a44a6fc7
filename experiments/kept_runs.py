"""train.py runs kept per training length: the study's runs (sweep.py's length, copy and copy-variants parts).

Not part of the paper. Each run is `python train.py` with the default job's flags plus the part's, trained
on to each length by resuming its folder's checkpoint; at each length its checkpoint and log are kept beside
it (RUN/ckpt_<L>.pt, RUN/log_<L>.jsonl), so a later invocation measures only the lengths it lacks.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from pages import images  # noqa: E402
import semantica  # noqa: E402


def log(*a):
    print(*a, flush=True)


def train_to(out, steps, flags=()):
    """train.py with the default job's flags (plus `flags`, e.g. ("--pairs", "same")) to `steps` (resuming the
    folder's checkpoint) -> seconds. Its end-of-run grid is cut to one sample (a resumable flag): the parts
    draw their own grids."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--out", out, "--steps", str(steps),
           "--sample-every", str(10 ** 9), "--grid-images", "1", "--grid-n", "1", *flags] + \
        (["--resume"] if os.path.exists(os.path.join(out, "ckpt.pt")) else [])
    log("$ " + " ".join(cmd))
    t = time.time()
    if subprocess.run(cmd).returncode:
        raise SystemExit("train.py failed (command above)")
    return time.time() - t


def final_loss(path, step):
    """The last logged mean loss at or before `step` in a train.py log.jsonl."""
    with open(path) as f:
        recs = [r for r in map(json.loads, f) if r.get("step", 0) <= step and "loss" in r]
    return recs[-1]["loss"]


def save_grid(cond, samples, path, rows=8):
    """Condition then its samples, one row per condition (3x nearest upscale) -> PNG."""
    rows = torch.cat([cond[:rows, None], samples[:rows]], 1)
    grid = torch.cat([torch.cat(list(r), 2) for r in rows], 1)
    images.save_png(torch.nn.functional.interpolate(grid[None], scale_factor=3, mode="nearest")[0], path)


def train_kept(run, steps, flags=()):
    """Train the run in `run` on to `steps` (train_to) and keep its checkpoint and log at that length
    (run/ckpt_<steps>.pt, run/log_<steps>.jsonl; the run goes on from run/ckpt.pt) -> seconds."""
    ckpt = os.path.join(run, "ckpt.pt")
    done = semantica.read_checkpoint(ckpt)["step"] if os.path.exists(ckpt) else 0
    if done > steps:
        raise SystemExit(f"{run} is at step {done} > {steps}: delete it to measure shorter runs")
    seconds = train_to(run, steps, flags)
    for name, kept in (("log.jsonl", os.path.join(run, f"log_{steps}.jsonl")),
                       ("ckpt.pt", os.path.join(run, f"ckpt_{steps}.pt"))):
        shutil.copyfile(os.path.join(run, name), kept + ".tmp")
        os.replace(kept + ".tmp", kept)
    return round(seconds)


def kept_run(run, steps, flags):
    """train_kept, or the seconds of a checkpoint kept by an earlier, interrupted invocation (its log's time)."""
    if not os.path.exists(os.path.join(run, f"ckpt_{steps}.pt")):
        return train_kept(run, steps, flags)
    with open(os.path.join(run, f"log_{steps}.jsonl")) as f:
        return round([json.loads(x) for x in f if x.strip()][-1].get("elapsed_s", 0))
