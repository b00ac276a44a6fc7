"""A training run's bookkeeping: validation, checkpoints and exact resume, logs, signals.

Machinery, not the paper (§6.1 trains for ~300K steps on 256 TPUv3 chips: a run that long is stopped,
resumed and watched). Validation: the flags nothing can be computed with, the pair filter band (App. C),
paths, inputs and optional packages, all refused before any work as one-line `UserError`s. Checkpoints:
the state of semantica.py's format ("semantica-ckpt/2") plus train-only keys, and every check that makes
--resume exact (same config, world size, synthetic pages, stream readers). Logs: stdout lines above the
progress bar, log.jsonl, TensorBoard, loss.png. Signals: SIGTERM / SIGINT ask the loop to save and stop.
train.py's `main` calls these in order; the loop itself stays in train.py.
Shared: `UserError` (sample_runs.py raises it too) and `survive_lost_output`, which every command calls first
(stdout and stderr surviving a vanished reader). A sampling run's bookkeeping is machinery/sample_runs.py.
"""
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from machinery import backends
from pages import embeddings
import encoders
from pages import images
from pages import pairs
import semantica
from pages import shards
from pages import stream
import uvit

CKPT_NAME = "ckpt.pt"  # in --out
# TrainConfig fields that may change between a checkpoint and its resumption; any other difference is an error.
RESUMABLE = {"steps", "resume", "reshard", "log_every", "ckpt_every", "sample_every", "sample_steps",
             "grid_images", "grid_n", "compile", "grad_checkpoint", "num_workers", "max_pixels", "out", "encoder_weights",
             "tensorboard", "device", "cond_cache", "backend"}  # backend: check_world guards the world size
RESHARDABLE = {"micro_batch", "fsdp"}  # may also change with --reshard (another world size)


class UserError(ValueError):
    """A bad flag, input or output path: the CLI prints one line, argparse-style, and exits with status 2."""


# ----------------------------------------------------------------------------- validation (before any work)

def check_numbers(cfg):
    """The first flag value nothing can be computed with, as a message (None when all are usable)."""
    for name in ("steps", "batch", "log_every", "ckpt_every", "sample_every", "sample_steps", "grid_images", "grid_n"):
        if getattr(cfg, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}"
    for name in ("micro_batch", "num_workers", "seed", "num_pages"):
        if getattr(cfg, name) < 0:
            return f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}"
    if cfg.seed > semantica.MAX_SEED:
        return f"--seed must be at most 2^63 - 1 = {semantica.MAX_SEED} (torch and numpy seeds are 64-bit), got {cfg.seed}"
    for name, low, high in (("lr", 0, math.inf), ("beta1", 0, 1), ("beta2", 0, 1), ("adam_eps", 0, math.inf),
                            ("ema_decay", 0, 1), ("p_uncond", 0, 1), ("guidance", -math.inf, math.inf),
                            ("filter_low", -1, 1), ("filter_high", -1, 1)):
        v = getattr(cfg, name)
        if v is not None and not (math.isfinite(v) and low <= v <= high and (name != "lr" or v > 0)):
            span = " > 0" if name == "lr" else "" if math.isinf(low) and math.isinf(high) else f" in [{low}, {high}]"
            return f"--{name.replace('_', '-')} must be a finite number{span}, got {v}"
    if cfg.max_pixels < -1:
        return f"--max-pixels must be -1 (Pillow's limit), 0 (none) or a pixel count, got {cfg.max_pixels}"
    if cfg.filter_low is not None and cfg.filter_high is not None and cfg.filter_low >= cfg.filter_high:
        return f"--filter-low {cfg.filter_low} must be below --filter-high {cfg.filter_high} (-1 and 1 = no filter)"
    return None


def filter_band(cfg):
    """cfg with the pair filter thresholds resolved: explicit flags, else the encoder's (App. C). UserError for
    a band pairs.check_band refuses (one flag given, the other's default on its wrong side)."""
    if cfg.filter_low is None or cfg.filter_high is None:
        try:
            low, high = pairs.filter_band(cfg.encoder)
        except (KeyError, ValueError) as e:
            raise UserError(f"no App. C filter band for --encoder {cfg.encoder} ({e}): pass --filter-low and "
                            f"--filter-high") from e
        cfg = dataclasses.replace(cfg, filter_low=low if cfg.filter_low is None else cfg.filter_low,
                                  filter_high=high if cfg.filter_high is None else cfg.filter_high)
    try:
        pairs.check_band(cfg.filter_low, cfg.filter_high)
    except ValueError as e:
        raise UserError(f"--filter-low/--filter-high: {e}") from e
    return cfg


def check_paths(cfg):
    """User errors found before any work: output folder, checkpoint vs --resume, inputs, optional packages."""
    path = os.path.join(cfg.out, CKPT_NAME)
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UserError(f"--out {cfg.out} is a file, not a folder")
    if cfg.resume and not os.path.isfile(path):
        raise UserError(f"--resume: no checkpoint at {path}")
    if not cfg.resume and os.path.exists(path):
        raise UserError(f"{path} exists: pass --resume to continue it, or choose a new --out")
    if cfg.reshard and not cfg.resume:
        raise UserError("--reshard only applies with --resume")
    for flag, value in (("--data", cfg.data), ("--encoder-weights", cfg.encoder_weights),
                        ("--cond-cache", cfg.cond_cache)):
        if value and value not in ("synthetic", "shards", "encode") and not shards.is_pattern(value) and not os.path.exists(value):
            raise UserError(f"{flag} {value}: no such file or folder")
    if cfg.encoder not in encoders.ENCODER_PRESETS and not cfg.encoder_weights:
        raise UserError(f"unknown --encoder {cfg.encoder}; presets: {', '.join(sorted(encoders.ENCODER_PRESETS))}")
    if cfg.model not in uvit.PRESETS:
        raise UserError(f"unknown --model {cfg.model}; presets: {', '.join(sorted(uvit.PRESETS))}")
    if cfg.cond_cache == "encode" and shards.is_pattern(cfg.data):
        raise UserError("--cond-cache encode reads a folder, manifest or synthetic --data; page shards carry their "
                        "tokens (data.py filter --image-size, then --cond-cache shards)")
    if cfg.select_pairs and (cfg.pairs != "page" or shards.is_pattern(cfg.data)):
        raise UserError("--select-pairs selects page pairs (--pairs page) from a folder, manifest or synthetic --data; "
                        "page shards carry the pairs of their data.py filter band")
    if cfg.toy_encoder and (cfg.encoder != "tiny" or cfg.encoder_weights or cfg.random_encoder):
        raise UserError("--toy-encoder trains --encoder tiny itself: it takes no --encoder-weights or --random-encoder "
                        f"(got --encoder {cfg.encoder}{' --encoder-weights' if cfg.encoder_weights else ''}"
                        f"{' --random-encoder' if cfg.random_encoder else ''}); --no-toy-encoder turns it off")
    if not (cfg.resume or cfg.encoder_weights or cfg.random_encoder or cfg.toy_encoder):
        name = encoders.OFFICIAL_FILES.get(cfg.encoder, f"the official checkpoint of {cfg.encoder}")
        raise UserError(
            f"--encoder {cfg.encoder} needs its pretrained weights: download {name} and pass --encoder-weights "
            f"PATH (a random encoder would silently train a meaningless model; --random-encoder allows smoke runs)")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {cfg.device}: CUDA is not available")
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:  # an optional extra
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard")
    if shards.is_pattern(cfg.data):  # page shards: probe for the first readable page (bounded), check its filter
        try:
            _, first = shards.first_page(shards.expand(cfg.data), shards.PROBE_SHARDS)
        except ValueError as e:
            raise UserError(f"--data {cfg.data}: {e}") from e
        f, band = first["meta"].get("filter") or {}, [cfg.filter_low, cfg.filter_high]
        if cfg.pairs == "page" and band != [-1, 1] and [f.get("low"), f.get("high")] != band:
            raise UserError(f"--data {cfg.data}: shards not filtered with {band} (found "
                            f"{[f['low'], f['high']] if f else 'no filter'}): run python data.py filter with that band, "
                            f"pass the shards' band, or train unfiltered with --filter-low -1 --filter-high 1")
    why = images.folder_error(cfg.out)                  # made once the inputs are known good (main)
    if why:
        raise UserError(f"--out {cfg.out}: {why}")


def check_shard_tokens(f, cfg, encoder, image_size):
    """--cond-cache shards: the filter record `f` of the first page (its meta "filter") must hold this encoder's
    tokens at this size, for cross-attention (§3.2); else a UserError naming what differs."""
    ident = lambda w, s: f"weights {w}" if w else f"random init, seed {s}" if s is not None else "weights unrecorded"  # noqa: E731
    size = f.get("token_size")
    problem = next((text for bad, text in (
        (not f, "the shards carry no filter result; tokens are stored by data.py filter --image-size "
                f"{image_size}"),
        (cfg.conditioning != "cross_attention", f"--conditioning {cfg.conditioning} conditions on the global "
                                                "feature, not on the stored tokens: drop --cond-cache shards"),
        (size is None, f"the shards hold no tokens (filtered without --image-size): re-run data.py filter "
                       f"--image-size {image_size}"),
        (size != image_size, f"the shards' tokens are at {size} px, this run trains at {image_size} px: re-run "
                             f"data.py filter --image-size {image_size}"),
        (f.get("encoder") != encoder.name, f"the shards' tokens are {f.get('encoder')}'s, this run's encoder is "
                                           f"{encoder.name}"),
        (f.get("encoder_fingerprint") != embeddings.encoder_fingerprint(encoder),
         f"the shards' tokens come from another {encoder.name} (other weights: shards "
         f"{ident(f.get('encoder_weights'), f.get('encoder_seed'))}, this run {ident(encoder.weights, encoder.seed)})"),
    ) if bad), None)
    if problem:
        raise UserError(f"--cond-cache shards: {problem}")


# ----------------------------------------------------------------------------- checkpoints and exact resume

def checkpoint_state(cfg, d, header, model, ema, opt, step, data_position, log_window=None):
    """The checkpoint (semantica.py's format, semantica-ckpt/2) of the unwrapped model + train-only keys.
    log_window: (loss sum, steps) of a log window a stop cut short, so that --resume logs the row an
    uninterrupted run would.

    Every rank must call this: under FSDP gathering the full state is a collective.
    """
    msd, esd, osd = backends.full_states(model, ema, opt, d)
    return {**header, "model": msd, "ema": esd, "step": step, "ema_decay": cfg.ema_decay, "train_config": asdict(cfg),
            # train-only: the optimiser, the world size, this rank's data position, global samples consumed
            "optimizer": osd, "world": d.world, "data_position": data_position, "samples": step * cfg.batch,
            "log_window": log_window}


def load_checkpoint(path, cfg=None):
    """Load a train.py checkpoint on CPU, its model, EMA and optimiser keys by the one rule of every file read
    (encoders.strip_prefixes: no "module." / "_orig_mod." prefixes); with cfg, refuse one written by an
    incompatible config."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: ranks share pages
    except FileNotFoundError as e:
        raise UserError(f"no checkpoint at {path}") from e
    except Exception as e:  # truncated / not a torch file
        raise UserError(f"{path} is not a readable checkpoint: {encoders.load_failure(e)}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != semantica.FORMAT or "optimizer" not in ckpt:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path} is not a resumable train.py checkpoint (format {semantica.FORMAT}; found {found})")
    if cfg is not None:
        ok = RESUMABLE | (RESHARDABLE if cfg.reshard else set())
        diff = {k: (v, getattr(cfg, k, None)) for k, v in ckpt["train_config"].items()
                if k not in ok and v != getattr(cfg, k, None)}
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise UserError(f"{path} was written by another config ({lines}); use another --out or the same flags")
    key = lambda k: encoders.strip_prefixes(k) if isinstance(k, str) else k  # noqa: E731  (XLA optimisers: numbers)
    opt = ckpt["optimizer"]
    return {**ckpt, "model": {key(k): v for k, v in ckpt["model"].items()},
            "ema": {key(k): v for k, v in ckpt["ema"].items()},
            "optimizer": {**opt, "state": {key(k): v for k, v in opt["state"].items()},
                          "param_groups": [{**g, "params": [key(p) for p in g["params"]]} for g in opt["param_groups"]]}}


def check_world(ckpt, cfg, d):
    """Same world size: exact resume. Another one needs --reshard, and is then not bit-identical."""
    if ckpt is None or ckpt["world"] == d.world or not d.is_main and cfg.reshard:
        return
    if not cfg.reshard:
        raise UserError(f"checkpoint written with world size {ckpt['world']}, now {d.world}: pass --reshard "
                        f"to continue it (same global batch; not bit-identical to an uninterrupted run)")
    say(f"RESHARD: world size {ckpt['world']} -> {d.world}. Model, EMA, optimiser and step are restored and the "
        f"global batch stays {cfg.batch}, but the continuation is not bit-identical to an uninterrupted run: "
        f"each rank's shard of the data order and each rank's noise/timestep/dropout draws depend on the "
        f"rank and world size, and gradients are summed in another order.")


def check_resume_pages(ckpt, cfg, pages, tell):
    """Synthetic pages: their fingerprint (seed, count, drawing style) -> stored in the checkpoint. A resume on
    other synthetic pages (e.g. a run from before the one-large-object style) is a UserError; a checkpoint
    without the record only gets a warning (it cannot tell)."""
    if cfg.data != "synthetic":
        return None
    now = pages.fingerprint()
    if ckpt is not None:
        was = ckpt.get("train_pages")
        if was is None:
            tell("warning: the checkpoint does not record its synthetic pages (written before they were recorded); "
                 f"this run continues on {now}")
        elif was != now:
            raise UserError(f"--resume: the checkpoint was trained on other synthetic pages ({was}; now {now}); "
                            "start a new --out")
    return now


def check_stream_resume(ckpt, cfg, d):
    """A streaming run's readers, checked before anything is written or announced: one per (rank, worker), each
    owning shards, so there must be as many shards, and a run continues exactly (same world size and
    --num-workers) or not at all."""
    position = ckpt.get("data_position") if ckpt is not None else None
    workers = max(1, cfg.num_workers)
    if isinstance(position, dict) and position["world"] != d.world:
        raise UserError(f"cannot resume a streaming run with another world size (checkpoint {position['world']}, "
                        f"now {d.world}): its readers own shards by rank")
    if isinstance(position, dict) and position["ranks"][d.rank]["workers"] != workers:
        raise UserError(f"cannot resume a streaming run with another --num-workers (checkpoint "
                        f"{position['ranks'][d.rank]['workers']}, now {workers}): its readers own shards by worker")
    if shards.is_pattern(cfg.data) and len(shards.expand(cfg.data)) < d.world * workers:
        raise UserError(f"--data {cfg.data}: {len(shards.expand(cfg.data))} shards cannot feed {d.world * workers} "
                        f"readers (world {d.world} x {workers} workers): write smaller shards or use fewer workers")


def stream_position(loader, d):
    """The checkpoint's data position of a streaming run: every rank's StreamLoader.position() (a collective,
    every rank calls it) -> {"format", "world", "ranks": [...]}."""
    mine = loader.position()
    if d.kind == "ddp":
        ranks = [None] * d.world
        dist.all_gather_object(ranks, mine)
    else:  # one process (stream_dataset refuses several XLA replicas)
        ranks = [mine]
    return {"format": stream.FORMAT, "world": d.world, "ranks": ranks}


# ----------------------------------------------------------------------------- logs

def say(*args):
    """print to stdout, above the progress bar."""
    tqdm.write(" ".join(map(str, args)), file=sys.stdout)
    sys.stdout.flush()


class Logger:
    """log.jsonl (timestamped; truncated to the checkpoint's step on resume), stdout lines with a smoothed
    ETA, optional TensorBoard, and loss.png at the end. Only rank 0 writes."""

    def __init__(self, cfg, d, start_step, cut_window=False):
        """cut_window: the checkpoint carries the log window its stop cut short; that row is replaced."""
        self.cfg, self.on, self.start_step, self.t_start = cfg, d.is_main, start_step, time.time()
        self.path, self.tb, self.losses = os.path.join(cfg.out, "log.jsonl"), None, []
        if not self.on:
            return
        last = start_step - 1 if cut_window else start_step
        kept = [json.dumps(r) + "\n" for r in read_log(self.path) if r["step"] <= last]
        with open(self.path + ".tmp", "w") as f:  # --resume: drop the records of steps that will be replayed
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional extra, checked in check_paths
            self.tb = SummaryWriter(os.path.join(cfg.out, "tb"), purge_step=last + 1)

    def step(self, step, loss, gnorm, n_steps, seconds):
        """One log record: the mean loss of the last n_steps steps (host values)."""
        if not np.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step} (mean since step {step - n_steps}); stopping. "
                                     f"The last good checkpoint is left untouched in {self.cfg.out}")
        self.losses.append((step, loss))
        # ETA from the mean step time since this process started (smooth; not a window of recent steps)
        eta = (time.time() - self.t_start) / max(1, step - self.start_step) * (self.cfg.steps - step)
        rec = dict(step=step, loss=loss, lr=self.cfg.lr, grad_norm=gnorm, img_per_s=n_steps * self.cfg.batch / seconds,
                   eta_s=eta, time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   elapsed_s=time.time() - self.t_start)
        if not self.on:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        for k in ("loss", "lr", "grad_norm", "img_per_s"):
            self.tb and self.tb.add_scalar(f"train/{k}", rec[k], step)
        say(f"step {step}/{self.cfg.steps}  loss {loss:.4f}  grad {gnorm:.3g}  lr {self.cfg.lr:.2e}  "
            f"{rec['img_per_s']:.1f} img/s  ETA {datetime.timedelta(seconds=int(eta))}")

    def image(self, step, canvas):
        if self.tb:
            self.tb.add_image("variations", canvas, step, dataformats="HWC")

    def close(self):
        """loss.png of the whole run (from log.jsonl) when matplotlib is installed."""
        if not self.on:
            return
        if self.tb:
            self.tb.close()
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        recs = read_log(self.path)
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot([r["step"] for r in recs], [r["loss"] for r in recs])
        ax.set(xlabel="step", ylabel="loss (eps space, Eq. 3)", yscale="log")
        fig.tight_layout()
        fig.savefig(os.path.join(self.cfg.out, "loss.tmp.png"))
        plt.close(fig)
        os.replace(os.path.join(self.cfg.out, "loss.tmp.png"), os.path.join(self.cfg.out, "loss.png"))


def read_log(path):
    """The records of a log.jsonl (none if absent); a torn last line (a crash mid-write) is skipped."""
    if not os.path.exists(path):
        return []
    recs = []
    with open(path) as f:
        for line in f:
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return recs


def progress(cfg, d, start_step):
    """The progress bar between log lines (stderr; rank 0): steps, rate and ETA; redrawn every 60 s into a
    log file."""
    return tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step", disable=not d.is_main,
                mininterval=1 if sys.stderr.isatty() else 60, dynamic_ncols=True)


def report(logger, d, step, running, n_steps, gnorm, seconds):
    """Hand the mean loss since the last report to the logger (XLA: after the step's graph ran)."""
    running = backends.mean_over_ranks(running, d)
    fn = lambda: logger.step(step, running.item() / n_steps, gnorm.item(), n_steps, seconds)  # noqa: E731
    backends.xla_report(fn, ()) if d.kind == "xla" else fn()


# ----------------------------------------------------------------------------- signals

STOP = []  # signals received (SIGTERM from a scheduler, SIGINT from Ctrl-C): the loop saves, then exits


def install_stop_handlers():
    """SIGTERM and SIGINT append to STOP (-> STOP, the previous handlers). Python runs signal handlers in a
    process's main thread only; a torch_xla replica runs in a worker thread, so there nothing is installed
    and the loop reads the STOP that xla_launch's handlers (inherited by fork) fill."""
    if threading.current_thread() is not threading.main_thread():
        return STOP, {}
    STOP.clear()
    return STOP, {s: signal.signal(s, lambda sig, frame: STOP.append(sig)) for s in (signal.SIGTERM, signal.SIGINT)}

