"""Reproduce Semantica's central claims at small scale, end to end on a CPU, and write RESULTS.md.

Semantica (arXiv 2405.14857). Four diffusion models are trained with train.py on the same pages, the
default job's recipe (train.py --res 32: U-ViT tiny-32-p2, its loss weighting) and its frozen encoder
(pages/toy_encoder.py), differing only in their training pairs or their conditioning:
  - reconstruction      cond = target (Eq. 2, §4)
  - pages+filter        cond and target from one page, cosine-filtered (Eq. 3, §5, App. C)
  - pages               the same pair selection with the band [-1, 1]: no filter (App. C's ablation; every
                        page-pair setting draws its selected pairs uniformly, so only the band differs)
  - pages+filter FiLM   the CLS token by FiLM instead of tokens by cross-attention (App. D)
They are evaluated with sample.py's K-shot evaluation (the project's sampler) and metrics.py, on test
pages that nobody trained on, and a copy model (returns its conditioning image) is scored alongside.
The claims, each reported as holds / does not hold with its numbers:
  1. §4, Fig. 2: reconstruction samples are near-copies of their condition, page-pair samples are not.
  2. §7, Fig. 3: as guidance rises, one-shot recall falls while full-set recall does not fall.
  3. §7: the copy model gets near-perfect full-set FID/recall and a collapsing one-shot recall.
  4. on one-shot FID: page pairs beat reconstruction (§8.2); filtering helps (App. C / Fig. 8);
     cross-attention beats FiLM (§6.2 / App. D / Fig. 9).
The frozen encoder (pages/toy_encoder.py) and the metric features (experiments/features.py) are trained on
held-out synthetic pages, as DINOv2 / SigLIP and Inception were trained elsewhere. This file is the pipeline (pages,
networks, train.py, sample.py, scores) and its command line; the presets, settings and criteria are
claims_setup.py, the verdicts and RESULTS.md claims_report.py.

    python experiments/claims.py            # full run (seed 0: ~26 min on a 2-core EPYC without AVX-512) -> experiments/RESULTS.md
    python experiments/claims.py --quick    # smoke run (~1-2 min) -> OUT/RESULTS.md
    python experiments/claims.py --data DIR # train and test on a pages folder ROOT/<page>/<image>
    python experiments/claims.py --report   # rewrite RESULTS.md from the last run's results.json (seconds)
    python experiments/claims.py --steps 3000  # the same at 2x the training -> experiments/RESULTS-steps3000.md
    python experiments/claims.py --train-seeds 0,1,2   # also retrain the denoisers with train.py seeds 1, 2:
                                            # each claim's verdict per seed (training variance), ~26 min a seed

Everything is seeded; trained networks, checkpoints and samples are cached under --out (reruns reuse
them, and RESULTS.md counts a reused phase with the time of the run that computed it; delete the folder for a
run from scratch). Left out: the paper's scale (256/512 px, 300K steps,
50M pairs, 50K-sample FID), SigLIP, the user study, Inception/DINOv2 weights (not downloadable here).
"""
import argparse
import csv
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import data  # noqa: E402
import encoders  # noqa: E402
from pages import images  # noqa: E402
import features  # noqa: E402  (experiments/features.py: a library module of this folder, no main)
import kinds  # noqa: E402  (experiments/kinds.py: the object-kind classifier)
import metrics  # noqa: E402
import outputs  # noqa: E402  (experiments/outputs.py: output paths refused in one line)
import semantica  # noqa: E402
from pages import synthetic, toy_encoder  # noqa: E402
from claims_report import grids_folder, jsonable, judge, seed_summary, write_results  # noqa: E402  (RESULTS.md)
from claims_setup import (FILTER, PRESETS, SETTINGS, SWEEP, TEST_COPY_RMSE, TEST_PAGES_SEED,  # noqa: E402
                          W_ABLATION, ClaimsConfig, default_command, load_samples, steps_suffix)


def log(*a):
    print(*a, flush=True)


def machine():
    """The machine a run was measured on, in one line: '[GPU + ]CPU model, N cores, AVX-512[ + bf16] | no AVX-512,
    torch X, T thread(s)' (Linux reads /proc/cpuinfo; elsewhere platform.processor() and no SIMD flags). Speed and,
    through float rounding, the trained models depend on it (an AVX2 and an AVX-512 CPU train different ones)."""
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


def run_script(script, **flags):
    """python ROOT/script --flag value ...: train.py and sample.py run as their own processes, exactly as a
    user runs them (scripts never import scripts). True/False become --x/--no-x, tuples comma lists."""
    cmd = [sys.executable, os.path.join(ROOT, script)]
    for k, v in flags.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            cmd.append(flag if v else "--no-" + flag[2:])
        else:
            cmd += [flag, ",".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)]
    log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd)
    if proc.returncode:
        raise SystemExit(f"{script} failed with exit status {proc.returncode} (command above)")


# ----------------------------------------------------------------------------- data

def synthetic_test_pages(cc):
    """Clean test "classes" (no outliers / duplicates), per_page images each (§8.2: ten per class)."""
    return synthetic.SyntheticPages(cc.test_pages, cc.size, seed=TEST_PAGES_SEED, p_outlier=0.0, p_duplicate=0.0,
                               images_per_page=(cc.per_page, cc.per_page))


def check_style(out):
    """OUT caches pages, networks and checkpoints of one synthetic-pages style (synthetic.SyntheticPages
    defaults): a folder made with another style is refused (its cached runs would be silently reused)."""
    want = synthetic.SyntheticPages(1).style()
    path = os.path.join(out, "pages_style.json")
    if os.path.exists(path):
        with open(path) as f:
            have = json.load(f)
        if have != want:
            raise SystemExit(f"{out} holds runs on other synthetic pages ({have}, now {want}): delete it or pass --out")
    elif any(os.path.exists(os.path.join(out, d)) for d in ("runs", "test_pages", "eval")):
        raise SystemExit(f"{out} holds runs of an earlier version (no pages_style.json): delete it or pass --out")
    else:
        with open(path, "w") as f:
            json.dump(want, f)


def scan_pages(cc, data_arg):
    """--data DIR or manifest -> (pages {name: [paths]}, held-out test page names, copies {training image: the
    test image it copies}, digests {path: SHA-1 of the image as the model sees it}); `pages` no longer holds the
    copies (copies_of_test), so the test pages are never trained on. Every image is decoded once, as the model
    sees it (images.load_image at cc.size), and kept as float16 for the copy check and its digest (6 KB an image
    at 32 px, 24 KB at 64 px, freed on return). A file that does not decode (a
    truncated JPEG passes the header check) is skipped and logged: sample.py would skip it too, scoring the
    samples against other test images. ValueError (one line) for an unreadable source or too few pages for
    the test set; main() turns it into a usage error before OUT is created."""
    try:
        pages, skipped = data.scan(data_arg)             # listed, headers checked; decoded below
    except (ValueError, OSError) as e:
        raise ValueError(f"--data {data_arg}: {e}") from None
    views = {}
    for p in dict.fromkeys(p for n in sorted(pages) for p in pages[n]):   # a file listed twice: decoded once
        try:
            views[p] = images.load_image(p, cc.size).flatten().half()
        except Exception as e:                           # noqa: BLE001 (any decoder error: a logged skip)
            skipped[p] = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            log(f"skipping {p}: {skipped[p]}")
    pages = {n: ps for n, ps in ((n, [p for p in ps if p in views]) for n, ps in pages.items()) if ps}
    big = [n for n in sorted(pages) if len(pages[n]) >= cc.per_page]
    if len(big) < cc.test_pages + 1:
        raise ValueError(f"{data_arg}: needs more than {cc.test_pages} pages with >= {cc.per_page} images "
                         f"(found {len(big)}; {skip_summary(skipped)})")
    held = set(np.random.default_rng(cc.seed).choice(big, cc.test_pages, replace=False).tolist())
    copies = copies_of_test(pages, held, views)
    if copies:
        log(f"--data: {len(copies)} training image(s) copy a test image (RMSE < {TEST_COPY_RMSE} at {cc.size} px), "
            f"left out of training, e.g. {next(iter(copies))} = {next(iter(copies.values()))}")
    pages = {n: [p for p in ps if p not in copies] for n, ps in pages.items()}
    digests = {p: hashlib.sha1(views[p].numpy().tobytes()).hexdigest()[:16] for ps in pages.values() for p in ps}
    return {n: ps for n, ps in pages.items() if ps}, held, copies, digests


def copies_of_test(pages, held, views, tol=TEST_COPY_RMSE):
    """Training images (pages not in `held`) that copy a test image as the model sees it -> {path: test path}.
    views: {path: the image as train.py loads it (images.load_image: centre crop, resized, [-1, 1]), flattened};
    a copy is an RMSE < `tol` to some test image (claims_setup.TEST_COPY_RMSE). A web crawl repeats images
    across pages (the same picture on two pages, two toolchains' copies of one manual): without this the
    "held-out" test images would be trained on. Distances: one training page against the test set at a time."""
    test_paths = [p for n in sorted(held) for p in pages[n]]
    test = torch.stack([views[p] for p in test_paths]).double()
    copies = {}
    for n in sorted(pages):
        if n in held:
            continue
        x = torch.stack([views[p] for p in pages[n]]).double()
        rmse, j = (torch.cdist(x, test) / x.shape[1] ** 0.5).min(1)
        copies.update({pages[n][i]: test_paths[j[i]] for i in (rmse < tol).nonzero().flatten().tolist()})
    return copies


def split_record(data_arg, scanned):
    """The --data split a run trains and tests on -> {"test": [[page, file, digest], ...], "train": [...]} (what
    OUT/data_split.json keeps). Files relative to the --data folder, or to a manifest's folder (a moved tree is the
    same split); digest: scan_pages's SHA-1 of the image as the model sees it, so an image changed in place is
    another split. scanned: scan_pages's answer."""
    pages, held, _, digests = scanned
    root = os.path.abspath(data_arg) if os.path.isdir(data_arg) else os.path.dirname(os.path.abspath(data_arg))
    return {split: sorted([n, os.path.relpath(os.path.abspath(p), root), digests[p]] for n in pages
                          if (n in held) == (split == "test") for p in pages[n]) for split in ("test", "train")}


def split_error(out, data_arg, scanned):
    """One line when OUT holds runs on another split of --data, else None. A --data folder that gained, lost or
    renamed pages or images since the run holds out other test pages: OUT's checkpoints (trained on the old
    training pages, perhaps on today's test pages) and cached samples (of the old test conditions) would be
    reused and scored against the new test set."""
    path = os.path.join(out, "data_split.json")
    if not os.path.isfile(path):
        if any(os.path.exists(os.path.join(out, d)) for d in ("runs", "eval")):
            return f"{out} holds runs of an earlier version (no data_split.json): delete it or pass --out"
        return None
    try:
        with open(path) as f:
            have = json.load(f)
        have = {s: {tuple(x) for x in have[s]} for s in ("test", "train")}
    except (ValueError, KeyError, TypeError) as e:
        return f"{path} is unreadable ({type(e).__name__}): delete {out} or pass --out"
    want = {s: {tuple(x) for x in v} for s, v in split_record(data_arg, scanned).items()}
    if have != want:
        n = {s: (len(want[s] - have[s]), len(have[s] - want[s])) for s in have}
        return (f"{out} holds runs on another split of --data (test images: {n['test'][0]} new or changed, "
                f"{n['test'][1]} gone or changed; training images: {n['train'][0]} new or changed, "
                f"{n['train'][1]} gone or changed since that run): delete it or pass another --out")
    return None


def prepare_pages(cc, out, data_arg, scanned=None):
    """-> (train source for train.py, test source for sample.py). Synthetic: write the test pages as
    PNG folders. --data DIR: hold out `test_pages` pages with >= per_page images, manifests for both
    (scanned: scan_pages's answer when the caller already has it)."""
    if data_arg == "synthetic":
        test = os.path.join(out, "test_pages")
        if not os.path.isdir(test):
            synthetic_test_pages(cc).write(test + ".tmp")
            os.replace(test + ".tmp", test)
        return "synthetic", test
    pages, held = (scanned or scan_pages(cc, data_arg))[:2]
    names = sorted(pages)
    paths = {}
    for split, keep in (("train", lambda n: n not in held), ("test", lambda n: n in held)):
        paths[split] = os.path.join(out, f"{split}_manifest.csv")
        with open(paths[split], "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)                            # quotes page names with commas or quote marks
            w.writerow(["page", "path"])
            w.writerows([n, os.path.abspath(p)] for n in names if keep(n) for p in pages[n])
    return paths["train"], paths["test"]


def skip_summary(skipped):
    """{path: reason} of scan_pages -> '3 files skipped: 1 not inside a page folder, 2 unreadable' (each file's
    reason is in the log)."""
    if not skipped:
        return "no file skipped"
    reasons = {}
    for r in skipped.values():
        r = r if r in ("not inside a page folder", "missing file (or not a file)") else "unreadable"
        reasons[r] = reasons.get(r, 0) + 1
    return f"{len(skipped)} files skipped: " + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))


def eval_dir(out, name, proto):
    """OUT/eval/<setting>/<protocol>: sample.py's K-shot samples of one setting (found from OUT, so a moved
    or renamed work folder still reports)."""
    return os.path.join(out, "eval", name.replace(" ", "_"), proto)


def test_images(cc, test_source):
    """The N test images in sample.few_shot's order -> (images (N,3,S,S), page id (N,))."""
    pages, _ = data.open_pages(test_source, cc.size, decode=True)          # as sample.py's K-shot plan
    items = [(p, i) for p in range(len(pages)) for i in range(pages.count(p))]
    groups = [p for p, _ in items]
    keep = metrics.balanced_subset(groups, cc.per_page, cc.seed)      # as sample.few_shot
    return torch.stack([pages.image(*items[j]) for j in keep]), torch.tensor([groups[j] for j in keep])


# ----------------------------------------------------------------------------- training (train.py)

def train_config(cc, name, out, train_source, encoder_path):
    """-> train.py's flags for one setting (on top of its --res 32 preset)."""
    s = SETTINGS[name]
    return dict(res=32, model=cc.model, encoder="tiny", encoder_weights=encoder_path, random_encoder=False,
                data=train_source, num_pages=cc.train_pages, pairs=s["pairs"], conditioning=s["conditioning"],
                filter_low=FILTER[0] if s["filter"] else -1.0, filter_high=FILTER[1] if s["filter"] else 1.0,
                select_pairs=s["pairs"] == "page",   # App. C: the unfiltered arm differs by the band only
                steps=cc.steps, batch=cc.batch, lr=cc.lr, ema_decay=cc.ema_decay, seed=cc.train_seed,
                sample_steps=cc.sample_steps, grid_images=2, grid_n=3, log_every=max(1, cc.steps // 8),
                ckpt_every=cc.steps, sample_every=cc.steps, num_workers=cc.num_workers,
                out=os.path.join(out, "runs", name.replace(" ", "_")))


def train_setting(cfg):
    """Run train.py unless a finished checkpoint of the same config exists -> (ckpt path, final loss)."""
    path = os.path.join(cfg["out"], "ckpt.pt")
    resume = os.path.exists(path)
    if resume:
        ckpt = semantica.read_checkpoint(path)
        stored = ckpt.get("train_config", {})
        old, new = (os.path.dirname(os.path.dirname(c)) for c in (stored.get("out") or "", cfg["out"]))   # OUT then, now

        def here(v):   # a path inside the work folder it was trained in (its manifest, encoder): the same file now
            return os.path.join(new, os.path.relpath(v, old)) if isinstance(v, str) and old and \
                v.startswith(old + os.sep) else v
        def same(k, then, now):   # the encoder's file name is the hash of its recipe (toy_encoder.pretrained): the
            # same name is the same encoder wherever its folder is now (a moved or another clone)
            if k == "encoder_weights" and isinstance(then, str) and isinstance(now, str):
                return os.path.basename(then) == os.path.basename(now)
            return here(then) == now
        diff = {k: (stored.get(k), v) for k, v in cfg.items() if k not in ("out", "steps") and not same(k, stored.get(k), v)}
        if diff:
            raise SystemExit(f"{path} was trained with another config ({diff}); delete {new}/runs to retrain "
                             "every setting, or choose another --out")
        if ckpt["step"] >= cfg["steps"]:
            log(f"reusing {path} (step {ckpt['step']})")
            resume = None
    if resume is not None:
        run_script("train.py", **cfg, resume=resume)
    with open(os.path.join(cfg["out"], "log.jsonl")) as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    return path, losses[-1]


FLAG_OF = {"steps": "--steps", "seed": "--train-seeds"}   # train_config keys a claims.py flag sets directly


def earlier_run_clash(cc, out, data_arg="synthetic"):
    """A one-line refusal when OUT already holds a denoiser trained with other flags (another --steps,
    --profile, --quick or seed), else None. train_setting refuses the same checkpoint, but only after the
    networks, pages and earlier settings have run, and naming train.py's derived keys (log_every, ckpt_every)."""
    for name in SETTINGS:
        want = train_config(cc, name, out, None, None)
        path = os.path.join(want["out"], "ckpt.pt")
        if not os.path.exists(path):
            continue
        try:
            stored = semantica.read_checkpoint(path).get("train_config") or {}
        except Exception as e:                           # noqa: BLE001 (any unreadable file: one line)
            return f"{path} is not a readable train.py checkpoint ({type(e).__name__}); delete it to retrain"
        ours = ("steps", "model", "batch", "lr", "ema_decay", "seed", "sample_steps", "num_pages", "pairs",
                "conditioning", "filter_low", "filter_high", "select_pairs")
        if "data" in stored and (stored["data"] == "synthetic") != (data_arg == "synthetic"):
            return (f"{want['out']} was trained on --data {'synthetic' if stored['data'] == 'synthetic' else 'files'} "
                    f"(this run: --data {data_arg}); rerun with that run's --data or choose another --out")
        diff = [k for k in ours if k in stored and stored[k] != want[k]]
        if diff:
            k = diff[0]
            flag = FLAG_OF.get(k, "--profile / --quick")
            return (f"{want['out']} was trained with {k} {stored[k]} (this run: {want[k]}); rerun with that run's "
                    f"{flag} or choose another --out")
    return None


def filter_report(cfg, encoder_path, size):
    """Pairs before/after the §5 filter with the frozen encoder (shares train.py's embedding cache)."""
    pages, _ = data.open_pages(cfg["data"], size, **(dict(num_pages=cfg["num_pages"], seed=cfg["seed"])
                                                   if cfg["data"] == "synthetic" else {}))
    encoder = encoders.from_checkpoint(encoder_path)     # loaded as a user loads DINOv2
    _, rep = data.build_pairs(pages, encoder, os.path.join(cfg["out"], "cache"), cfg["filter_low"],
                              cfg["filter_high"])
    return rep


# ----------------------------------------------------------------------------- evaluation (sample.py)

def metric_size(x):
    """The metric networks (feature CNN, kind classifier) are 32 px networks: larger images are area-
    downsampled to 32 px first (DESIGN: as Inception resizes every input to 299 px)."""
    return x if x.shape[-1] == 32 else torch.nn.functional.interpolate(x, size=(32, 32), mode="area")


def few_shot(cc, ckpt, test_source, k, guidances, out):
    """sample.py --few-shot K (K-shot samples + metrics in the encoder's space), cached -> its kshot.json."""
    summary = os.path.join(out, "kshot.json")
    if os.path.exists(summary):
        with open(summary) as f:
            s = json.load(f)
        if s["steps"] == cc.sample_steps and set(s["results"]) == {str(float(w)) for w in guidances} and \
                os.path.getmtime(summary) > os.path.getmtime(ckpt):
            return s
    run = os.path.join(out, "run.json")                  # samples of a checkpoint rewritten since (a retrained
    if os.path.exists(run) and os.path.getmtime(run) < os.path.getmtime(ckpt):   # model): redrawn, not refused
        shutil.rmtree(out)
    run_script("sample.py", ckpt=ckpt, few_shot=k, data=test_source, per_group=cc.per_page,
               guidance=tuple(float(w) for w in guidances), steps=cc.sample_steps, seed=cc.seed, out=out,
               batch=cc.sample_batch)
    with open(summary) as f:
        return json.load(f)


def bootstrap_fid_std(real, fake, n, seed):
    """Std of FID over `n` resamples (with replacement) of both sets: a noise scale, not an interval."""
    rng, vals = np.random.default_rng(seed), []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(n):
            i, j = rng.integers(len(real), size=len(real)), rng.integers(len(fake), size=len(fake))
            vals.append(metrics.frechet_distance(real[i], fake[j]))
    return float(np.std(vals))


def score(cc, real_img, real_f, page, fake_img, fake_f, cond):
    """K-shot metrics in the feature network's space plus copy diagnostics (pixels and features)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                  # FID with N <= D (quick preset) warns
        res = metrics.kshot_metrics(real_f, fake_f)
    conds, counts = torch.unique_consecutive(cond, return_counts=True)
    res["alignment"] = metrics.alignment(real_f[conds], fake_f, counts)         # §8.2, Fig. 5
    res["fid_std"] = bootstrap_fid_std(real_f, fake_f, cc.bootstrap, cc.seed)
    rms = lambda a, b: (a - b).flatten(1).square().mean(1).sqrt()               # pixel RMSE, [-1, 1] scale
    res["pixel_to_cond"] = rms(fake_img, real_img[cond]).mean().item()
    div_px, div_f = [], []
    for c in conds.tolist():                                                    # pairs of samples of one cond
        m = (cond == c).nonzero().flatten()
        if len(m) > 1:
            a, b = torch.triu_indices(len(m), len(m), 1)
            div_px.append(rms(fake_img[m[a]], fake_img[m[b]]).mean())
            div_f.append((fake_f[m[a]] - fake_f[m[b]]).norm(dim=1).mean())
    res["pixel_diversity"] = torch.stack(div_px).mean().item() if div_px else float("nan")
    res["feature_diversity"] = torch.stack(div_f).mean().item() if div_f else float("nan")
    return res


def fid_vs_test_size(cc, real_f, page, fake_f, cond):
    """One-shot FID and its bootstrap std on the first 1/4, 1/2 and all of the test pages (the
    same samples, restricted to those pages' conditions; fake_f their features, cond each one's test
    image) -> [{pages, n, fid, fid_std}]."""
    pages, rows = page.unique().tolist(), []
    for k in sorted({max(2, len(pages) // 4), max(2, len(pages) // 2), len(pages)}):
        keep = torch.tensor(pages[:k])
        r, f = torch.isin(page, keep), torch.isin(page[cond], keep)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fid = metrics.frechet_distance(real_f[r], fake_f[f])
        rows.append(dict(pages=k, n=int(r.sum()), fid=float(fid),
                         fid_std=bootstrap_fid_std(real_f[r], fake_f[f], cc.bootstrap, cc.seed)))
    return rows


def real_reference(real_img, real_f, page):
    """The same diagnostics between two real images of one test page: the scale of a real variation."""
    px, ft, cos = [], [], []
    for p in page.unique().tolist():
        m = (page == p).nonzero().flatten()
        a, b = torch.triu_indices(len(m), len(m), 1)
        px.append((real_img[m[a]] - real_img[m[b]]).flatten(1).square().mean(1).sqrt().mean())
        ft.append((real_f[m[a]] - real_f[m[b]]).norm(dim=1).mean())
        cos.append(torch.nn.functional.cosine_similarity(real_f[m[a]], real_f[m[b]], dim=1).mean())
    return {"pixel_diversity": torch.stack(px).mean().item(), "feature_diversity": torch.stack(ft).mean().item(),
            "alignment": torch.stack(cos).mean().item()}


def copy_model(cc, real_f, page):
    """§7: a model that returns its conditioning image, scored with the full-set and one-shot protocols."""
    full = metrics.kshot_metrics(real_f, real_f.clone())               # K = N: every test image copied once
    plan = metrics.kshot_select(page.tolist(), 1, cc.seed)             # one-shot: one image per page
    idx = torch.tensor([c for c, n in plan for _ in range(n)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = metrics.kshot_metrics(real_f, real_f[idx])
    return {"full": full, "one_shot": one, "k_over_n": len(plan) / len(real_f)}


def duplicate_count(x):
    """Images (N, ...) that are pixel-identical to another image of the set. A copy model's one-shot sample then
    also matches the duplicate, so its one-shot recall exceeds K/N (claim 3) on a test set with duplicates."""
    _, counts = torch.unique(x.flatten(1), dim=0, return_counts=True)
    return int(counts[counts > 1].sum())


# ----------------------------------------------------------------------------- main

def reused(paths, since):
    """Whether a phase read its outputs from the --out cache instead of computing them: all of `paths`
    exist and predate the phase's start `since` (time.time())."""
    return bool(paths) and all(os.path.exists(p) and os.path.getmtime(p) < since for p in paths)


def earlier_timing(out, cc, data_arg):
    """Per-phase seconds of the run that computed OUT's cache (its results.json), for the phases this run
    reuses; {} without one or when it was another config or data."""
    try:
        with open(os.path.join(out, "results.json")) as f:
            r = json.load(f)
        now = json.loads(json.dumps(dataclasses.asdict(cc)))       # a field added since: its default then
        same = {**json.loads(json.dumps(dataclasses.asdict(ClaimsConfig()))), **r["config"]} == now and \
            (r["data"] == data_arg or "synthetic" not in (r["data"], data_arg))  # --data: split_error checked it
        return {k: v for k, v in r["timing"].items() if k not in r.get("invocation", {}).get("unrecorded", [])} if same else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def run(cc, out, data_arg, results_path, networks=None, others=(), command=None, started=None, scanned=None):
    """The whole pipeline for one training seed -> the result dict (also OUT/results.json and RESULTS.md).
    networks: the folder of the encoder, feature CNN and kind classifier (default OUT/networks; --train-seeds
    shares the first seed's, so that every seed is measured in the same spaces); others: seed_summary dicts of
    runs with other training seeds, reported in RESULTS.md's across-seeds section; command: the command line
    RESULTS.md names (default: rebuilt from cc and data_arg); started: time.time() when the invocation began
    (--train-seeds: before the other seeds' runs), for the invocation's wall time; scanned: scan_pages's answer
    for --data (scanned here when None)."""
    t0, timing, hits = time.time(), {}, []
    net_dir = networks or os.path.join(out, "networks")
    earlier = earlier_timing(out, cc, data_arg)
    torch.manual_seed(cc.seed)
    if scanned is None and data_arg != "synthetic":
        try:
            scanned = scan_pages(cc, data_arg)           # refused before OUT exists
        except ValueError as e:
            raise SystemExit(str(e)) from None
    os.makedirs(out, exist_ok=True)
    check_style(out)
    if scanned is not None:
        bad = split_error(out, data_arg, scanned)
        if bad:
            raise SystemExit(bad)
    train_source, test_source = prepare_pages(cc, out, data_arg, scanned)
    if scanned is not None and not os.path.exists(os.path.join(out, "data_split.json")):
        with open(os.path.join(out, "data_split.json.tmp"), "w") as f:
            json.dump(split_record(data_arg, scanned), f)
        os.replace(os.path.join(out, "data_split.json.tmp"), os.path.join(out, "data_split.json"))

    log("== 1/4 pretrained networks (held-out synthetic pages)")
    enc_path = toy_encoder.pretrained(log=log)   # the default job's encoder (weights/)
    feat_path = features.pretrained_feature_net(net_dir, cc.feature_steps, cc.bank_pages, cc.seed, log=log)
    feat_net = features.load_feature_net(feat_path)
    real_img, page = test_images(cc, test_source)
    real_small = metric_size(real_img)                   # what the 32 px metric networks see
    real_f = torch.from_numpy(metrics.extract_features(feat_net, real_small.split(256), progress=False))
    kind = torch.tensor([synthetic_test_pages(cc).label(p) for p in page.tolist()]) \
        if data_arg == "synthetic" else None
    classifier = None
    if kind is not None:                                 # semantics with a ground truth (kinds.py)
        classifier, classifier_report = kinds.train_classifier(net_dir,
                                                               pages=cc.classifier_pages, steps=cc.classifier_steps,
                                                               log=log)
        log(f"kind classifier: held-out accuracy {classifier_report['held_out_accuracy']:.3f}")
    enc = encoders.from_checkpoint(enc_path)
    spaces = {}
    if kind is not None:
        torch.manual_seed(cc.seed)                      # the random baselines do not depend on the cache
        rand_enc, rand_cnn = encoders.load_encoder("tiny", seed=cc.seed), features.feature_cnn().eval()
        with torch.no_grad():
            for label, f in (("conditioning encoder (trained)", enc(real_img)[0]),
                             ("same ViT, random weights", rand_enc(real_img)[0]),
                             ("feature CNN (trained)", real_f), ("same CNN, random weights",
                                                                 rand_cnn(real_small))):
                spaces[label] = features.space_report(f, page, kind)
    timing["networks"] = time.time() - t0
    hits += ["networks"] * reused([os.path.join(net_dir, f) for f in os.listdir(net_dir)], t0)

    log("== 2/4 diffusion models (train.py)")
    runs, filt = {}, None
    for name in SETTINGS:
        t = time.time()
        cfg = train_config(cc, name, out, train_source, enc_path)
        if SETTINGS[name]["filter"] and filt is None:
            filt = filter_report(cfg, enc_path, cc.size)
            log({k: v for k, v in filt.items() if k != "histogram"})
        ckpt, loss = train_setting(cfg)
        runs[name] = {"ckpt": ckpt, "loss": loss, "seconds": time.time() - t}
        timing[f"train {name}"] = time.time() - t
        hits += [f"train {name}"] * reused([ckpt], t)

    log("== 3/4 K-shot evaluation (sample.py)")
    ws = sorted(set(cc.guidances) | {0.0, W_ABLATION})
    plan = {name: {"one_shot": [0.0, W_ABLATION] if name == "reconstruction" else [W_ABLATION]} for name in SETTINGS}
    plan[SWEEP] = {"one_shot": ws, "full": ws}
    evals, encoder_space, fid_n = {}, {}, None
    for name, protocols in plan.items():
        for proto, gws in protocols.items():
            t = time.time()
            d = eval_dir(out, name, proto)
            s = few_shot(cc, runs[name]["ckpt"], test_source, 1 if proto == "one_shot" else cc.per_page, gws, d)
            for w in gws:
                fake_img, cond = load_samples(d, float(w), cc.size)
                fake_small = metric_size(fake_img)
                fake_f = torch.from_numpy(metrics.extract_features(feat_net, fake_small.split(256), progress=False))
                evals[(name, proto, w)] = score(cc, real_img, real_f, page, fake_img, fake_f, cond)
                if (name, proto, w) == (SWEEP, "one_shot", W_ABLATION):
                    fid_n = fid_vs_test_size(cc, real_f, page, fake_f, cond)     # same features
                if classifier is not None:               # conditions = the test images that were sampled from
                    evals[(name, proto, w)]["kind"] = kinds.kind_scores(
                        classifier, real_small, kind, fake_small, cond, real_small, kind)
                res = dict(s["results"][str(float(w))])      # sample.py: alignment per space; the default
                res["alignment"] = next(iter(res["alignment"].values()))   # space is the checkpoint's encoder
                encoder_space[(name, proto, w)] = res
                evals[(name, proto, w)]["samples_dir"] = d
            timing[f"eval {name} {proto}"] = time.time() - t
            hits += [f"eval {name} {proto}"] * reused([os.path.join(d, "kshot.json")], t)

    log("== 4/4 claims and RESULTS.md")
    copy = copy_model(cc, real_f, page)
    copy["duplicates"] = duplicate_count(real_img)       # test images a copy of another one matches exactly
    ref = real_reference(real_img, real_f, page)
    timing["total"] = wall = time.time() - t0
    # a phase found in the cache counts with the seconds of the run that computed it (RESULTS.md's wall time is
    # the computation's, not that of a rerun over a full cache)
    for k in hits:
        timing["total"] += earlier.get(k, timing[k]) - timing[k]
        timing[k] = earlier.get(k, timing[k])
    invocation = dict(seconds=time.time() - (started or t0), reused=hits, unrecorded=[k for k in hits if k not in earlier])
    result = dict(config=dataclasses.asdict(cc), data=data_arg, test=test_source, spaces=spaces, filter=filt,
                  runs={k: {"loss": v["loss"], "seconds": v["seconds"], "ckpt": v["ckpt"]} for k, v in runs.items()},
                  evals=evals, encoder_space=encoder_space, copy=copy, real_reference=ref, timing=timing,
                  feature_net=feat_net.name, encoder=enc_path, guidances=ws,
                  classifier=classifier_report if classifier is not None else None, fid_vs_n=fid_n,
                  machine=machine(), invocation=invocation, other_seeds=list(others),
                  train_copies_of_test=None if scanned is None else scanned[2],
                  command=command or default_command(cc, data_arg))
    claims = judge(result, SWEEP, W_ABLATION)
    result["claims"] = claims
    with open(os.path.join(out, "results.json") + ".tmp", "w") as f:     # first: a report that fails keeps the record
        json.dump(jsonable(result), f, indent=1)
    os.replace(os.path.join(out, "results.json") + ".tmp", os.path.join(out, "results.json"))
    write_results(result, results_path, real_img, page)
    log(f"wrote {results_path} ({timing['total'] / 60:.1f} min of computation; this invocation {wall / 60:.1f} min, "
        f"{len(hits)} phase(s) reused from {out})")
    for c in claims:
        log(f"claim {c['id']}: {c['verdict']} - {c['summary']}")
    return result


def load_result(out):
    """OUT/results.json of an earlier run -> (result dict with tuple eval keys, its ClaimsConfig); one-line
    SystemExit when it is missing or not a claims.py results file."""
    path = os.path.join(out, "results.json")
    if not os.path.exists(path):
        raise SystemExit(f"{path}: no earlier run to report; run python experiments/claims.py first")
    try:
        with open(path) as f:
            r = json.load(f)
        cc = ClaimsConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in r["config"].items()})
        for key in ("evals", "encoder_space"):          # jsonable's "name|protocol|w" keys back to tuples
            r[key] = {(k.split("|")[0], k.split("|")[1], float(k.split("|")[2])): v for k, v in r[key].items()}
        for (name, proto, _), e in r["evals"].items():   # this folder's samples, wherever the run was made
            e["samples_dir"] = eval_dir(out, name, proto)
        r["claims"] = judge(r, SWEEP, W_ABLATION)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise SystemExit(f"{path}: not a claims.py results file ({type(e).__name__}: {e})")
    return r, cc


def report(out, results_path, command, other_outs=(), cc_want=None, data_arg=None):
    """Rewrite RESULTS.md from OUT/results.json of an earlier run (no training or sampling): the claims are
    judged again and the grids redrawn from its cached samples, with the same code as a full run. For a run whose
    report layout changed since. other_outs: the work
    folders of the other training seeds (--train-seeds), judged again too. One-line SystemExit when a run or
    its samples are missing. cc_want / data_arg: the preset (with its training length) and data the flags ask for; a results.json of
    another run is refused (its report would land where the flags' run reports, e.g. experiments/RESULTS.md)."""
    r, cc = load_result(out)
    path = os.path.join(out, "results.json")
    same_data = lambda a, b: a == b or "synthetic" not in (a, b) and os.path.abspath(a) == os.path.abspath(b)  # noqa: E731
    if cc_want is not None and not (cc.preset == cc_want.preset and cc.steps == cc_want.steps
                                    and same_data(r["data"], data_arg)):
        raise SystemExit(f"{path} is a {cc.preset} run of {cc.steps} steps on --data {r['data']}, not the "
                         f"{cc_want.preset} run of {cc_want.steps} steps on --data {data_arg} these flags ask for: "
                         "pass the flags it was made with")
    missing = sorted({e["samples_dir"] for e in r["evals"].values() if not os.path.isdir(e["samples_dir"])})
    if missing:
        raise SystemExit(f"{path}: the run's samples are gone ({missing[0]}); rerun python experiments/claims.py")
    if r["data"] == "synthetic":
        _, test_source = prepare_pages(cc, out, r["data"])
    else:   # the run's own test set (a rescan of --data would hold out other pages if the folder has changed)
        test_source = os.path.join(out, "test_manifest.csv")
        if not os.path.isfile(test_source):
            raise SystemExit(f"{path}: the run's test manifest is gone ({test_source}); rerun python experiments/claims.py")
    real_img, page = test_images(cc, test_source)
    r["other_seeds"] = [seed_summary(load_result(o)[0], o) for o in other_outs]
    r["command"], r["reported"] = command, f"`{command} --report`"
    write_results(r, results_path, real_img, page)
    log(f"wrote {results_path} from {path}")
    for c in r["claims"]:
        log(f"claim {c['id']}: {c['verdict']} - {c['summary']}")
    return r


# ----------------------------------------------------------------------------- command line

def data_error(data_arg):
    """Why --data is no pages source, in one line (None when it may be one); checked before anything is written.
    Folders are listed (no image decoded), manifests parsed; scan_pages decodes the images later."""
    if data_arg == "synthetic":
        return None
    try:
        if os.path.isdir(data_arg):
            images.find_images(data_arg)               # ValueError when it holds no image
        elif os.path.isfile(data_arg):
            if not data.read_manifest(data_arg):
                return "a manifest with no rows (a .csv/.jsonl manifest needs page and path columns)"
        else:
            return "not a folder, a .csv/.jsonl manifest or 'synthetic'"
    except (ValueError, OSError) as e:
        return str(e)
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run of every code path (numbers meaningless)")
    ap.add_argument("--profile", choices=("cpu", "gpu"), default="cpu", help="cpu: 32 px tiny-32 (<= 45 min on 2 "
                    "cores); gpu: 64 px small-64 with 6.7x the training images (<= 8 min on one H100/H200)")
    ap.add_argument("--data", default="synthetic", help="pages folder ROOT/<page>/<image> or manifest; "
                    "default: synthetic pages. Needs more than test_pages pages with >= per_page decodable images "
                    "(held out as the test set; cpu: 20 pages of 10, gpu: 50 of 10, --quick: 4 of 5)")
    ap.add_argument("--out", help="work folder (default runs/claims[-<preset>][-steps<N>], e.g. runs/claims-quick)")
    ap.add_argument("--results", help="RESULTS.md path (default: experiments/RESULTS.md for the full synthetic run with "
                    "training seed 0 first, experiments/RESULTS-gpu.md for --profile gpu; OUT/RESULTS.md for --quick, "
                    "--data or another first seed)")
    ap.add_argument("--report", action="store_true", help="rewrite RESULTS.md from OUT/results.json of an earlier "
                    "run of the same flags (seconds: no training or sampling), e.g. after the report's layout changed")
    ap.add_argument("--steps", type=int, help="training steps of each of the four denoisers (default: the preset's, 500 "
                    "for the CPU profile); another length defaults to the work folder runs/claims[-<preset>]-steps<N> and the report "
                    "experiments/RESULTS[-gpu]-steps<N>.md (--quick, --data: OUT/RESULTS.md), e.g. --steps 2000: the claims after 4x the training")
    ap.add_argument("--train-seeds", default="0", help="comma list of train.py seeds for the four denoisers, e.g. "
                    "0,1,2: each trains and evaluates its own models (seed 0 in OUT, seed k in OUT-train-seed<k>; the "
                    "first seed's networks shared) and RESULTS.md adds every seed's claims (training variance)")
    args = ap.parse_args(argv)
    try:
        seeds = [int(k) for k in args.train_seeds.split(",")]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or max(seeds) > semantica.MAX_SEED or len(set(seeds)) != len(seeds):
        ap.error(f"--train-seeds must be distinct integers in [0, 2^63 - 1] separated by commas, got {args.train_seeds!r}")
    bad = data_error(args.data)
    if bad:
        ap.error(f"--data {args.data}: {bad}")
    name = {("cpu", False): "full", ("cpu", True): "quick", ("gpu", False): "gpu", ("gpu", True): "gpu-quick"}
    cc = PRESETS[name[args.profile, args.quick]]
    if args.steps is not None:
        if not 1 <= args.steps <= 10 ** 9:
            ap.error(f"--steps must be an integer in [1, 10^9], got {args.steps}")
        cc = dataclasses.replace(cc, steps=args.steps)
    longer = steps_suffix(cc)                            # "" at the preset's length, else "-steps<N>"
    if cc.preset == "gpu" and not torch.cuda.is_available():
        log("note: --profile gpu without a CUDA device: train.py and sample.py run on the CPU (hours)")
    base = args.out or os.path.join(ROOT, "runs", "claims" + ("" if cc.preset == "full" else "-" + cc.preset) + longer)
    outs = {k: base if k == 0 else f"{base}-train-seed{k}" for k in seeds}
    out = outs[seeds[0]]                                  # the first seed's run is the report's main one
    committed = os.path.join(HERE, ("RESULTS" if cc.preset == "full" else "RESULTS-gpu") + longer + ".md")
    results = args.results or (os.path.join(out, "RESULTS.md") if args.quick or args.data != "synthetic" or seeds[0]
                               else committed)
    for o in outs.values():
        if os.path.exists(o) and not os.path.isdir(o):
            ap.error(f"--out: {o} exists and is not a folder")
    for k in ([] if args.report else seeds):             # --report reads results.json and checks its length
        clash = earlier_run_clash(dataclasses.replace(cc, train_seed=k), outs[k], args.data)
        if clash:
            ap.error(clash)
    # --data's images are decoded once, here, before anything is written (output_error makes no folder either):
    # a refused --data leaves no folder behind
    try:
        scanned = None if args.report or args.data == "synthetic" else scan_pages(cc, args.data)
    except ValueError as e:                             # too few usable pages: a usage error, as --data's others
        ap.error(str(e))
    for k in ([] if scanned is None else seeds):         # OUT's runs were made on another split of --data
        bad = split_error(outs[k], args.data, scanned)
        if bad:
            ap.error(bad)
    grids = os.path.join(os.path.dirname(os.path.abspath(results)), grids_folder(results))   # written beside it
    bad = outputs.output_error("--results", results) or outputs.output_error("--results", grids, folder=True)
    if bad:
        ap.error(bad)
    command = default_command(cc, args.data, seeds, args.out, args.results)
    if args.report:
        return report(out, results, command, [outs[k] for k in seeds[1:]], cc, args.data)
    networks, others, started = os.path.join(out, "networks"), [], time.time()
    for k in seeds[1:]:                                   # the other seeds first: the main report lists them
        log(f"==== training seed {k} -> {outs[k]}")
        r = run(dataclasses.replace(cc, train_seed=k), outs[k], args.data, os.path.join(outs[k], "RESULTS.md"),
                networks, command=command, scanned=scanned)
        others.append(seed_summary(r, outs[k]))
    if others:
        log(f"==== training seed {seeds[0]} -> {out}")
    return run(dataclasses.replace(cc, train_seed=seeds[0]), out, args.data, results, networks, others, command,
               started, scanned)


if __name__ == "__main__":
    from machinery import flags
    flags.survive_lost_output()  # `| head`, a killed `| tee`: the run goes on
    main()
