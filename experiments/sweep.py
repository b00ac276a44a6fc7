"""What limits learning in the small-scale runs: a measured study (issue 20), written to experiments/SWEEP.md.

Not part of the paper (Semantica trains 300K steps of batch 2048 on TPUs, §6.1). The CPU default job
(`python train.py`: tiny-32, 600 steps of batch 32, a random tiny encoder, synthetic pages) and the claims
run have drawn colour-true blobs rather than shapes (README "Measured results"); this script measures
why, in eight parts:

  phases  images/s of each phase of the default job's step on this machine: rendering synthetic pages, the
          DataLoader (0 and 2 workers), the frozen encoder, the denoiser step (eager fp32, channels-last,
          bf16 autocast; torch.compile with --compile) and one guided DDPM sampling step.
  probe   do the conditioning tokens carry the condition? A ridge regression from the encoder's output to the
          condition's pixels and to its object kind, on held-out pages (random tiny encoder; the trained
          claims encoder too when --encoder-weights names it).
  length  the default job's flags trained on (train.py, resumed) to each of --lengths steps; at each length
          the kind agreement of its variations (experiments/kinds.py) and a grid of them.
  oracle  the encoder or the denoiser? The default job with an oracle condition whose tokens carry the
          condition's true object kind (experiments/oracle.py), trained to each of --lengths steps and scored
          like the length part; with the use part's loss measure of the kind (its own kind's vector against
          another kind's on the same tokens).
  copy    claim 1 against training length: the default job with --pairs same (§4's reconstruction model)
          trained to each of --lengths steps; at guidance 0 its samples' pixel RMSE to their condition and to
          each other, against two real images of one page and the length part's page-pair model.
  copy-variants  which difference keeps the claims run's reconstruction model from copying: the copy part's
          model with the claims run's trained encoder (--encoder-weights), or with its 2048 training pages, one
          at a time (--variants), trained to each of --lengths steps and scored like the copy part.
  ddpm    the longest run's kind agreement against the number of DDPM steps at evaluation.
  use     does the denoiser read its condition? Each length's diffusion loss (Eq. 1, eps space) at fixed noise
          levels t on held-out page pairs with the true condition, another page's condition, and the null:
          a model that ignores its condition scores the three alike.

    python experiments/sweep.py                              # every part -> experiments/SWEEP.md
    python experiments/sweep.py --parts phases,probe          # some parts (the others are kept from sweep.json)

Each part is stored in OUT/sweep.json with its command, wall time and machine; checkpoints are kept per
length (OUT/length/ckpt_<L>.pt, OUT/oracle/state_<L>.pt, OUT/copy/ckpt_<L>.pt, OUT/copy-<variant>/ckpt_<L>.pt), so a rerun measures only what is missing. Everything is DESIGN.
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import data  # noqa: E402
import diffusion  # noqa: E402
import encoders  # noqa: E402
import images  # noqa: E402
import kinds  # noqa: E402  (experiments/kinds.py: the object-kind classifier)
import machine  # noqa: E402  (experiments/machine.py: the machine, in one line)
import oracle  # noqa: E402  (experiments/oracle.py: the oracle-condition run)
import outputs  # noqa: E402  (experiments/outputs.py: output paths refused in one line)
import semantica  # noqa: E402
import synthetic  # noqa: E402
import uvit  # noqa: E402
from claims_setup import COPY_RATIO, ClaimsConfig  # noqa: E402  (claim 1's criterion; the claims run's setup)

PROBE_PAGES_SEED = 606     # DESIGN: held-out pages of their own seed for the token probe
EVAL = dict(pages=48, n=2, guidance=0.5, steps=64)   # kind agreement: 96 samples (binomial std <= 0.05)


def log(*a):
    print(*a, flush=True)


def rate(fn, items, repeat=3):
    """items per second of fn() (one warm-up call, then the best of `repeat` timed calls)."""
    fn()
    best = min(_timed(fn) for _ in range(repeat))
    return items / best


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ----------------------------------------------------------------------------- phases

def phases(compile_step=False, batch=32):
    """images/s of each phase of the default job's step (its model, encoder, pages and batch)."""
    pages = synthetic.SyntheticPages(512, 32)
    items = [(p, i) for p in range(64) for i in range(pages.count(p))]
    out = {"render synthetic images": rate(lambda: [pages.image(p, i) for p, i in items], len(items), 1)}
    pairs = data.PagePairs(pages, mode="page")
    for w in (0, 2):                                  # steady state: workers started and one batch out first
        it = iter(data.make_loader(pairs, batch, 0, 1, 0, num_workers=w))
        out[f"DataLoader, {w} workers (2 images per pair)"] = rate(lambda it=it: [next(it) for _ in range(8)],
                                                                   8 * batch * 2, 2)
        del it
    enc = encoders.load_encoder("tiny", seed=0)
    x = torch.rand(batch, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out["frozen encoder forward"] = rate(lambda: enc(enc.preprocess(x)), batch)
    cfg = uvit.PRESETS["tiny-32"]
    for mode in ("eager fp32", "channels-last fp32", "bf16 autocast") + (("torch.compile fp32",) if compile_step else ()):
        torch.manual_seed(0)
        model = semantica.Semantica(cfg, encoder=enc, p_uncond=0.1)
        ema = model.ema_copy()
        if mode.startswith("channels-last"):
            model = model.to(memory_format=torch.channels_last)
        if mode.startswith("torch.compile"):
            model.net.compile()
        opt = torch.optim.Adam(model.net.parameters(), 1e-3, betas=(0.9, 0.99), eps=1e-12)   # train.py's Adam
        cond = enc(enc.preprocess(x))[1].detach()                                         # precomputed tokens

        def step(model=model, opt=opt, ema=ema, amp=mode == "bf16 autocast", cond_in=x):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = model(x, cond_in)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            semantica.update_ema(ema, model, 0.99)
        t0 = time.perf_counter()
        step()                                                                            # warm-up (compile)
        warm = time.perf_counter() - t0
        out[f"train step, {mode} (encoder included)"] = batch / min(_timed(step) for _ in range(3))
        if mode == "eager fp32":
            out["train step, eager fp32, precomputed tokens (§3.2)"] = \
                batch / min(_timed(lambda: step(cond_in=cond)) for _ in range(3))
            with torch.no_grad():
                gen = torch.Generator().manual_seed(0)
                z, tt = torch.randn(2 * batch, 3, 32, 32, generator=gen), torch.full((2 * batch,), 0.5)
                c2 = torch.cat([cond, cond])
                out["sampling: one guided DDPM step (2 passes per image)"] = rate(lambda: model.net(z, tt, c2), batch)
        if mode.startswith("torch.compile"):
            log(f"torch.compile: first step (compilation) {warm:.0f} s")
    return {k: round(v, 1) for k, v in out.items()}


# ----------------------------------------------------------------------------- probe

def _ridge_fit_eval(f_tr, y_tr, f_te, y_te, lam=1e-2):
    """Ridge regression (dual form, features standardised) -> predictions on the test features."""
    mu, sd = f_tr.mean(0), f_tr.std(0) + 1e-6
    a, b = (f_tr - mu) / sd, (f_te - mu) / sd
    ym = y_tr.mean(0)
    k = a @ a.T
    alpha = torch.linalg.solve(k + lam * k.diagonal().mean() * torch.eye(len(a), dtype=a.dtype), y_tr - ym)
    return (b @ a.T) @ alpha + ym


@torch.no_grad()
def probe(encoder_weights=None, n_train=1500, n_test=500):
    """What a ridge regression recovers from the encoder's output on held-out clean pages: pixel RMSE of
    the condition ([-1, 1] scale) from the tokens and from the global feature, and object-kind accuracy."""
    pages = synthetic.SyntheticPages(800, 32, seed=PROBE_PAGES_SEED, p_outlier=0.0, p_duplicate=0.0)
    items = [(p, i) for p in range(len(pages)) for i in range(pages.count(p))][:n_train + n_test]
    x = torch.stack([pages.image(p, i) for p, i in items]).double()
    kind = torch.tensor([pages.label(p) for p, _ in items])
    y_pix, y_kind = x.flatten(1), torch.nn.functional.one_hot(kind, len(synthetic.KINDS)).double()
    encs = {"random tiny encoder (default job)": encoders.load_encoder("tiny", seed=0)}
    if encoder_weights:
        encs["trained tiny encoder (claims run)"] = encoders.from_checkpoint(encoder_weights)
    tr, te = slice(0, n_train), slice(n_train, None)
    res = {"baseline (mean image)": dict(pixel_rmse=(y_pix[te] - y_pix[tr].mean(0)).square().mean().sqrt().item())}
    kd = _ridge_fit_eval(y_pix[tr], y_kind[tr], y_pix[te], y_kind[te])       # what a linear probe gets from pixels
    res["raw pixels (reference for kind)"] = dict(pixel_rmse=0.0, kind_accuracy=(kd.argmax(1) == kind[te]).double().mean().item())
    for name, enc in encs.items():
        g, tok = enc(enc.preprocess(x.float()))
        for part, f in (("tokens", tok.flatten(1).double()), ("global", g.double())):
            pix = _ridge_fit_eval(f[tr], y_pix[tr], f[te], y_pix[te])
            kd = _ridge_fit_eval(f[tr], y_kind[tr], f[te], y_kind[te])
            res[f"{name}, {part}"] = dict(pixel_rmse=(pix - y_pix[te]).square().mean().sqrt().item(),
                                          kind_accuracy=(kd.argmax(1) == kind[te]).double().mean().item())
    return dict(train_images=n_train, test_images=len(items) - n_train, results=res)


# ----------------------------------------------------------------------------- length and DDPM steps

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


def length(out, lengths, classifier, state):
    """Train the default job to each length and score its variations; cached per length."""
    run = os.path.join(out, "length")
    style = synthetic.SyntheticPages(1)
    settings = dict(eval=EVAL, max_objects=list(style.max_objects), object_scale=list(style.object_scale))
    if state.get("settings", settings) != settings:
        raise SystemExit(f"{out}: the stored length rows were measured with {state['settings']}, now {settings}: "
                         f"delete {run} and the length part of {out}/sweep.json (or pass another --out)")
    state["settings"] = settings
    rows = state.setdefault("rows", {})
    for steps in sorted(lengths):
        keep = os.path.join(run, f"ckpt_{steps}.pt")
        if str(steps) in rows and os.path.exists(keep):
            continue
        if not os.path.exists(keep):
            state.setdefault("train_seconds", {})[str(steps)] = train_kept(run, steps)
        scores, cond, samples = kinds.evaluate_checkpoint(keep, classifier, **EVAL)
        save_grid(cond, samples, os.path.join(out, f"kinds_{steps}.png"))
        rows[str(steps)] = dict(loss=final_loss(os.path.join(run, f"log_{steps}.jsonl"), steps), **scores)
        log(f"length {steps}: {rows[str(steps)]}")
    return state


COPY_EVAL = dict(pages=48, n=2, guidance=0.0, steps=64)   # claim 1 is judged at guidance 0 (claims_setup)


def pixel_rmse(a, b):
    """Per-image pixel RMSE of (N, 3, S, S) images on the [-1, 1] scale -> (N,), as claims.score."""
    return (a - b).flatten(1).square().mean(1).sqrt()


def copy_scores(model, classifier, ev=COPY_EVAL, seed=0):
    """Claim 1's numbers for one model: `ev["n"]` samples at guidance ev["guidance"] of one condition per
    held-out test page (kinds.test_conditions) -> (dict(to_cond = mean pixel RMSE sample-to-condition,
    between = mean RMSE between two samples of one condition, agreement = kind agreement), cond, samples).
    Pixel RMSE per image on the [-1, 1] scale, as claims.score."""
    cond, kind = kinds.test_conditions(ev["pages"], model.net.config.image_size)
    samples = model.sample(cond, num_samples=ev["n"], guidance=ev["guidance"], steps=ev["steps"], seed=seed)
    index = torch.arange(len(cond)).repeat_interleave(ev["n"])
    flat = samples.flatten(0, 1)
    return dict(to_cond=pixel_rmse(flat, cond[index]).mean().item(),
                between=pixel_rmse(samples[:, 0], samples[:, 1]).mean().item(),
                agreement=kinds.kind_scores(classifier, cond, kind, flat, index)["agreement"]), cond, samples


def real_pair_rmse(pages=COPY_EVAL["pages"], size=32):
    """Mean pixel RMSE between images 0 and 1 of each held-out test page (kinds.test_conditions' pages):
    what a sample that is another image of the condition's page differs by."""
    src = synthetic.SyntheticPages(pages, size, seed=kinds.TEST_PAGES_SEED, p_outlier=0.0, p_duplicate=0.0)
    a, b = (torch.stack([src.image(p, i) for p in range(pages)]) for i in (0, 1))
    return pixel_rmse(a, b).mean().item()


# The claims run's reconstruction model differs from the copy part's in two ways; each variant makes one of
# them (DESIGN: which one keeps the claims run's model from copying at 4000 steps, README finding 7).
COPY_VARIANTS = {"encoder": "the claims run's trained encoder",
                 "pages": f"the claims run's {ClaimsConfig().train_pages} training pages"}


def copy_variant_flags(name, encoder_weights=None):
    """train.py flags that a copy variant adds to the reconstruction model's (`--pairs same`)."""
    if name == "encoder":
        return ("--encoder-weights", encoder_weights)
    return ("--num-pages", str(ClaimsConfig().train_pages))


def copy_variants(out, lengths, classifier, state, names, encoder_weights=None):
    """The copy part's reconstruction model with one difference of the claims run's (COPY_VARIANTS) each, trained
    on to each length in OUT/copy-<name> and scored by copy_scores -> state["variants"][name] = {what, setting,
    rows: {steps: {train_seconds, reconstruction}}}. A variant stored with another setting (another encoder
    file: its name is the hash of its recipe) is refused in one line."""
    variants = state.setdefault("variants", {})
    for name in names:
        flags = copy_variant_flags(name, encoder_weights)
        setting = os.path.basename(flags[1]) if name == "encoder" else flags[1]
        v = variants.setdefault(name, dict(setting=setting, rows={}))
        v["what"] = COPY_VARIANTS[name] + (f" ({setting})" if name == "encoder" else "")
        if name == "encoder":
            v["weights"] = encoder_weights                     # the path of this invocation (its command line)
        run = os.path.join(out, f"copy-{name}")
        if v["setting"] != setting:
            raise SystemExit(f"{out}: the copy variant {name!r} was measured with {v['setting']}, now {setting}: "
                             f"delete {run} and its rows in {out}/sweep.json (or pass another --out)")
        for steps in sorted(lengths):
            keep = os.path.join(run, f"ckpt_{steps}.pt")
            if str(steps) in v["rows"] and os.path.exists(keep):
                continue
            v["rows"][str(steps)] = row = copy_row({}, run, steps, flags, classifier,
                                                   os.path.join(out, f"copy-{name}_{steps}.png"))
            log(f"copy variant {name} {steps}: {row}")
    return state


def copy_variants_args(state):
    """copy-variants' flags in the command that measures every stored variant at every stored length (several
    invocations, e.g. --variants encoder then --variants pages, fill one table)."""
    v = state["variants"]
    lengths = sorted({int(s) for x in v.values() for s in x["rows"]})
    args = f" --lengths {','.join(map(str, lengths))} --variants {','.join(v)}"
    if "encoder" in v:
        args += f" --encoder-weights {shlex.quote(v['encoder'].get('weights') or v['encoder']['setting'])}"
    return args


def kept_run(run, steps, flags):
    """train_kept, or the seconds of a checkpoint kept by an earlier, interrupted invocation (its log's time)."""
    if not os.path.exists(os.path.join(run, f"ckpt_{steps}.pt")):
        return train_kept(run, steps, flags)
    with open(os.path.join(run, f"log_{steps}.jsonl")) as f:
        return round([json.loads(x) for x in f if x.strip()][-1].get("elapsed_s", 0))


def copy_row(row, run, steps, flags, classifier, grid):
    """A reconstruction model (`--pairs same` plus `flags`) in `run` at `steps`: trained or kept (kept_run; the
    row's train_seconds kept when its checkpoint is), scored by copy_scores, its grid saved -> row (updated)."""
    if not os.path.exists(os.path.join(run, f"ckpt_{steps}.pt")) or "train_seconds" not in row:
        row["train_seconds"] = kept_run(run, steps, ("--pairs", "same", *flags))
    row["reconstruction"], cond, samples = copy_scores(
        semantica.Semantica.from_checkpoint(os.path.join(run, f"ckpt_{steps}.pt")), classifier)
    save_grid(cond, samples, grid)
    return row


def copy_part(out, lengths, classifier, state):
    """Claim 1 against training length (§4: a model trained on (x, x) pairs copies its condition). The default
    job's flags with --pairs same (the reconstruction model) trained on to each length (OUT/copy, kept per
    length); at guidance 0 its samples' RMSE to their condition and to each other, against two real images of
    one page and, where the length part kept its run of that length, the page-pair model's."""
    run = os.path.join(out, "copy")
    rows = state.setdefault("rows", {})
    state["real_pair"] = real_pair_rmse()
    for steps in sorted(lengths):
        keep = os.path.join(run, f"ckpt_{steps}.pt")
        page_ckpt = os.path.join(out, "length", f"ckpt_{steps}.pt")
        row = rows.get(str(steps), {})
        if row and os.path.exists(keep) and (row.get("pages") or not os.path.exists(page_ckpt)):
            continue
        copy_row(row, run, steps, (), classifier, os.path.join(out, f"copy_{steps}.png"))
        if os.path.exists(page_ckpt):
            row["pages"] = copy_scores(semantica.Semantica.from_checkpoint(page_ckpt), classifier)[0]
        rows[str(steps)] = row
        log(f"copy {steps}: {row}")
    return state


def oracle_part(out, lengths, classifier, state):
    """The default job with an oracle condition (experiments/oracle.py) to each length, scored like the
    length part; the run is kept per length (OUT/oracle/state_<L>.pt) and resumed for longer lengths."""
    run = os.path.join(out, "oracle")
    os.makedirs(run, exist_ok=True)
    rows = state.setdefault("rows", {})
    for steps in sorted(lengths):
        keep = os.path.join(run, f"state_{steps}.pt")
        if str(steps) in rows and os.path.exists(keep):
            if "use" not in rows[str(steps)]:                # a row measured before the use columns existed
                rows[str(steps)]["use"] = oracle_use(oracle.load(keep))
            continue
        if os.path.exists(keep):
            run_state, loss = oracle.load(keep), rows.get(str(steps), {}).get("loss")
        else:
            latest = os.path.join(run, "state.pt")
            run_state = oracle.load(latest) if os.path.exists(latest) else oracle.new_state()
            if run_state["step"] > steps:
                raise SystemExit(f"{latest} is at step {run_state['step']} > {steps}: delete {run} to measure shorter runs")
            loss = oracle.train(run_state, steps, log=log)
            oracle.save(run_state, latest)
            shutil.copyfile(latest, keep + ".tmp")
            os.replace(keep + ".tmp", keep)
        scores, cond, samples = kinds.evaluate_checkpoint(None, classifier, **EVAL,
                                                          sample=lambda *a, s=run_state: oracle.sample(s, *a))
        save_grid(cond, samples, os.path.join(out, f"oracle_{steps}.png"))
        rows[str(steps)] = dict(loss=loss, **scores, use=oracle_use(run_state))
        log(f"oracle {steps}: {rows[str(steps)]}")
    return state


def oracle_use(run_state):
    """condition_use of an oracle run's EMA model: the loss with the condition's kind vector against another
    kind's on the same tokens (how much the denoiser reads the kind)."""
    ema = run_state["ema"]
    return condition_use(ema, n=USE_PAIRS, kind_vectors=oracle.kind_vectors(ema.config.cond_dim))


def ddpm(out, lengths, classifier, step_counts=(16, 64, 256)):
    """Kind agreement of the longest run against DDPM steps (32 conditions x 2 samples each)."""
    keep = os.path.join(out, "length", f"ckpt_{max(lengths)}.pt")
    model = semantica.Semantica.from_checkpoint(keep)
    rows = {}
    for s in step_counts:
        rows[str(s)], _, _ = kinds.evaluate_checkpoint(keep, classifier, pages=32, n=2, steps=s, model=model)
        log(f"DDPM steps {s}: {rows[str(s)]}")
    return dict(ckpt_step=max(lengths), rows=rows)


USE_T = (0.2, 0.4, 0.6, 0.8, 0.9, 0.95)   # DESIGN: noise levels of the use part (32 px: logsnr 2.3 .. -2.3 .. -5.1)
USE_CHUNKS = 8                             # DESIGN: the gap's standard error from 8 equal chunks of the pairs
USE_PAIRS = 128                            # DESIGN: held-out page pairs of the use part


@torch.no_grad()
def condition_use(model, n=USE_PAIRS, ts=USE_T, seed=0, chunks=USE_CHUNKS, kind_vectors=None):
    """Mean eps-space loss (Eq. 1 with w = SNR, diffusion.diffusion_loss) at each noise level t of `n`
    held-out page pairs (target image 1, condition image 0 of pages of seed PROBE_PAGES_SEED), with the same
    t and noise under three conditions -> {t: {"true", "shuffled" (the previous page's condition), "null",
    "gap" (shuffled - true), "gap_se" (its standard error over `chunks` equal chunks of the pairs)}}.
    kind_vectors (K, D): an oracle-condition model (experiments/oracle.py): "true" is the condition's tokens
    plus e_k of its kind k, "shuffled" the same tokens plus e_(k+1 mod K), another kind's vector."""
    if n % chunks:
        raise ValueError(f"n ({n}) must be a multiple of chunks ({chunks})")
    size = model.config.image_size
    pages = synthetic.SyntheticPages(n, size, seed=PROBE_PAGES_SEED)
    x = torch.stack([pages.image(p, 1) for p in range(n)])
    cond = model.as_cond(torch.stack([pages.image(p, 0) for p in range(n)]))
    null = model.null_cond.to(cond.dtype).expand_as(cond)
    if kind_vectors is None:
        conds = dict(true=cond, shuffled=cond.roll(1, 0), null=null)
    else:                                                      # what the condition shows (outliers: their kind)
        kind = torch.tensor([pages.kind(p, 0) for p in range(n)])
        conds = dict(true=oracle.with_kind(cond, kind, kind_vectors), null=null,
                     shuffled=oracle.with_kind(cond, (kind + 1) % len(kind_vectors), kind_vectors))
    g = torch.Generator().manual_seed(seed)
    rows = {}
    for t in ts:
        eps = torch.randn(x.shape, generator=g)
        tt = torch.full((n,), float(t))
        part = {k: torch.tensor([diffusion.diffusion_loss(lambda z, s, c=c[i]: model.net(z, s, c), x[i], t=tt[i],
                                                          eps=eps[i]).item()
                                 for i in torch.arange(n).chunk(chunks)]) for k, c in conds.items()}
        gaps = part["shuffled"] - part["true"]                    # paired: same pairs, t and noise
        rows[str(t)] = dict({k: v.mean().item() for k, v in part.items()}, gap=gaps.mean().item(),
                            gap_se=(gaps.std() / chunks ** 0.5).item())
    return rows


def use(out, lengths):
    """condition_use of each length's kept checkpoint."""
    rows = {}
    for steps in lengths:
        keep = os.path.join(out, "length", f"ckpt_{steps}.pt")
        rows[str(steps)] = condition_use(semantica.Semantica.from_checkpoint(keep), n=USE_PAIRS)
        log(f"use {steps}: {rows[str(steps)]}")
    return dict(rows=rows, pairs=USE_PAIRS)


# ----------------------------------------------------------------------------- SWEEP.md

def use_rows(rows):
    """Table rows of condition_use results per run length {steps: {t: {...}}}: loss under each condition,
    gap ± standard error, gap relative to the true condition's loss."""
    lines = []
    for s, by_t in sorted(rows.items(), key=lambda kv: int(kv[0])):
        for t, r in by_t.items():
            gap = f"{r['gap']:.5f} ± {r['gap_se']:.5f}" if "gap" in r else "-"
            lines += [f"| {s} | {t} | {r['true']:.4f} | {r['shuffled']:.4f} | {r['null']:.4f} | {gap} | "
                      f"{100 * (r['shuffled'] / r['true'] - 1):+.0f} % |"]
    return lines


def write_markdown(res, path):
    lines = ["# What limits learning at small scale (issue 20 study)", "",
             "Generated by `python experiments/sweep.py` (each part below names its command, wall time and "
             "machine; the numbers are read from `sweep.json`). Not part of the paper: Semantica trains "
             "300K steps of batch 2048 (§6.1); this measures how far the CPU presets are from showing shapes.", ""]
    meta = lambda part: f"*{part['command']}*, {part['seconds'] / 60:.1f} min, {part['machine']}."
    if "phases" in res:
        p = res["phases"]
        lines += ["## Where the time goes (default job: tiny-32, batch 32)", "", meta(p), "",
                  "| phase | images/s |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in p["results"].items()]
        lines += ["", "Each row on its own, best of a few timed calls. bf16 autocast is fast only on CPUs with "
                  "AVX-512 bf16 (the machine line says whether this one has it); the DataLoader rows are steady "
                  "state (workers already started); a training step needs both a loader batch and a step.", ""]
    if "probe" in res:
        p = res["probe"]
        lines += ["## Do the conditioning tokens carry the condition?", "", meta(p), "",
                  f"Ridge regression from the encoder output to the condition's pixels and to its object kind, "
                  f"fit on {p['train_images']} and measured on {p['test_images']} other held-out images "
                  f"(chance kind accuracy {1 / len(synthetic.KINDS):.3f}).", "",
                  "| features | pixel RMSE ([-1, 1] scale) | kind accuracy |", "| --- | --- | --- |"]
        for k, v in p["results"].items():
            ka = f"{v['kind_accuracy']:.3f}" if "kind_accuracy" in v else "-"
            lines += [f"| {k} | {v['pixel_rmse']:.3f} | {ka} |"]
        lines += ["", "A pixel RMSE far below the mean-image baseline means the tokens determine the condition (a "
                  "denoiser could copy it); kind accuracy is what a linear read-out gets (the raw-pixels row is "
                  "the same read-out on the pixels themselves).", ""]
    if "length" in res:
        p = res["length"]
        lines += ["## Sample quality against training length", "", meta(p), "",
                  f"The default job's flags (`python train.py`), resumed to each length; kind agreement of "
                  f"{EVAL['pages']} held-out conditions x {EVAL['n']} variations (guidance {EVAL['guidance']}, "
                  f"{EVAL['steps']} DDPM steps; chance 0.125; ± = binomial std counting every sample as independent, "
                  f"a lower bound since the two samples of a condition are correlated). Grids: `kinds_<steps>.png` "
                  f"in the work folder.", "",
                  "| steps x batch 32 | images seen | train loss | kind agreement | accuracy on samples / real |",
                  "| --- | --- | --- | --- | --- |"]
        lines += kinds.agreement_rows(p) + [""]
    if "oracle" in res:
        p = res["oracle"]
        lines += ["## Would the denoiser draw the kind if the condition carried it? (oracle condition)", "", meta(p), "",
                  "The default job's flags in experiments/oracle.py's loop, with the random encoder's tokens plus a "
                  "fixed random vector of the condition's true kind added to every token (a linear probe then reads "
                  "the kind from any token). Kind agreement as in the length part, on the same held-out "
                  "conditions; the train loss is the mean batch loss of the last 100 steps (the length table's is "
                  "train.py's logged mean of its last 25). Grids: `oracle_<steps>.png` in the work folder.", "",
                  "| steps x batch 32 | images seen | train loss (last 100 steps) | kind agreement | "
                  "accuracy on samples / real |", "| --- | --- | --- | --- | --- |"]
        lines += kinds.agreement_rows(p) + [""]
        use = {k: v["use"] for k, v in p["rows"].items() if "use" in v}
        if use:
            lines += ["Does the oracle denoiser read the kind? The use part's measure (below) on each oracle run: the "
                      "eps-space loss of the same held-out page pairs, t and noise, with the condition's tokens plus its "
                      "own kind's vector (true), plus another kind's vector (k + 1 mod 8; same tokens) and the null. "
                      f"Gap = another kind - true, ± its standard error over {USE_CHUNKS} chunks.", "",
                      "| run (steps) | t | true kind | another kind | null | gap (another - true) | relative |",
                      "| --- | --- | --- | --- | --- | --- | --- |"] + use_rows(use) + [""]
    if "copy" in res:
        p, ev = res["copy"], COPY_EVAL
        lines += ["## When does the reconstruction model copy? (claim 1 against training length)", "", meta(p), "",
                  f"The default job's flags with `--pairs same` (the §4 reconstruction model: condition = target), "
                  f"resumed to each length. Guidance {ev['guidance']} (claim 1's), {ev['pages']} held-out conditions x "
                  f"{ev['n']} samples, {ev['steps']} DDPM steps; pixel RMSE per image on the [-1, 1] scale. Claim 1 "
                  f"(claims_setup.COPY_RATIO) asks for a reconstruction RMSE to the condition under "
                  f"{COPY_RATIO} x the page-pair model's; two real images of one page differ by "
                  f"{p['real_pair']:.3f}. Page-pair columns: the length part's run of that length, where kept. "
                  "Grids: `copy_<steps>.png` in the work folder.", "",
                  "| steps x batch 32 | images seen | training seconds (since the previous length) | RMSE to condition: "
                  "reconstruction | page pairs | ratio | RMSE between samples: reconstruction | page pairs | kind "
                  "agreement: reconstruction | page pairs |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for s, r in sorted(p["rows"].items(), key=lambda kv: int(kv[0])):
            rec, pag = r["reconstruction"], r.get("pages")
            f = lambda key, d: "-" if d is None else f"{d[key]:.3f}"          # noqa: E731
            ratio = "-" if pag is None else f"{rec['to_cond'] / pag['to_cond']:.2f}"
            lines += [f"| {s} | {int(s) * 32} | {r.get('train_seconds', '-')} | {rec['to_cond']:.3f} | {f('to_cond', pag)} | {ratio} | "
                      f"{rec['between']:.3f} | {f('between', pag)} | {rec['agreement']:.3f} | {f('agreement', pag)} |"]
        lines += [""]
    if "copy-variants" in res:
        p, base = res["copy-variants"], res.get("copy", {}).get("rows", {})
        lines += ["## What keeps the claims run's reconstruction model from copying?", "", meta(p), "",
                  "The copy part's reconstruction model (the default job's flags with `--pairs same`: a random tiny encoder, "
                  f"{oracle.JOB['num_pages']} training pages) with one difference of the claims run's reconstruction model "
                  "at a time, scored as in the copy part (guidance 0). Training seconds: since the previous kept length of "
                  "that run, on the machine of its part's line (the copy part's: its section above). Grids: "
                  "`copy-<variant>_<steps>.png` in the work folder.", "",
                  "| steps x batch 32 | run | training seconds | RMSE to condition | RMSE between samples | kind agreement |",
                  "| --- | --- | --- | --- | --- | --- |"]
        runs = [("copy part (random encoder)", base)] + [
            (f"{name}: {v['what']}", v["rows"]) for name, v in p["variants"].items()]
        for s in sorted({int(k) for _, rows in runs[1:] for k in rows}):
            for label, rows in runs:
                if str(s) in rows:
                    r = rows[str(s)]
                    rec = r["reconstruction"]
                    lines += [f"| {s} | {label} | {r.get('train_seconds', '-')} | {rec['to_cond']:.3f} | "
                              f"{rec['between']:.3f} | {rec['agreement']:.3f} |"]
        lines += [""]
    if "ddpm" in res:
        p = res["ddpm"]
        lines += ["## Kind agreement against DDPM steps at evaluation", "", meta(p), "",
                  f"The {p['ckpt_step']}-step run, 32 conditions x 2 variations, guidance 0.5.", "",
                  "| DDPM steps | kind agreement | sampling seconds |", "| --- | --- | --- |"]
        for s, r in sorted(p["rows"].items(), key=lambda kv: int(kv[0])):
            lines += [f"| {s} | {r['agreement']:.3f} ± {kinds.agreement_std(r['agreement'], r['pages'] * r['n']):.3f} | "
                      f"{r['sample_seconds']} |"]
        lines += [""]
    if "use" in res:
        p, pairs = res["use"], res["use"].get("pairs", 128)          # sweep.json from before "pairs": 128
        lines += ["## Does the denoiser read its condition?", "", meta(p), "",
                  f"Mean eps-space loss (Eq. 1, w = SNR) of {pairs} held-out page pairs at fixed noise levels t, the same "
                  "noise under each condition: the true one (another image of the target's page), a shuffled one "
                  "(the previous page's) and the learned null. Gap = shuffled - true, ± its standard error over "
                  f"{USE_CHUNKS} chunks of {pairs // USE_CHUNKS} pairs (one noise draw); relative = gap / true. A denoiser that ignores "
                  "its condition has gap 0.", "",
                  "| run (steps) | t | true | shuffled | null | gap (shuffled - true) | relative |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += use_rows(p["rows"]) + [""]
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines))
    os.replace(path + ".tmp", path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="phases,probe,length,oracle,copy,copy-variants,ddpm,use",
                    help="comma list of phases, probe, length, oracle, copy, copy-variants, ddpm, use (default: all eight, "
                         "hours on a CPU; "
                         "each part rewrites its section of --results)")
    ap.add_argument("--lengths", default="600,2000",
                    help="training lengths (steps of batch 32) of the length, oracle, copy and copy-variants parts (default 600,2000; the "
                         "committed SWEEP.md: 600,2000,4000,6000,8000)")
    ap.add_argument("--ddpm-steps", default="16,64,256", help="ddpm: the DDPM step counts compared (default 16,64,256)")
    ap.add_argument("--compile", action="store_true", help="phases: also time a torch.compile'd step (minutes)")
    ap.add_argument("--encoder-weights", help="probe: also the trained claims encoder (a DINOv2-layout .pth); "
                    "copy-variants: the encoder of its 'encoder' variant (runs/claims/networks/tiny_dinov2_encoder_*.pth)")
    ap.add_argument("--variants",
                    help="copy-variants: comma list of the reconstruction model's variants, each with one difference of "
                         "the claims run's: " + "; ".join(f"{k}: {v}" for k, v in COPY_VARIANTS.items()) +
                         " (default: both with --encoder-weights, else pages)")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "sweep"), help="work folder of cached runs (default runs/sweep)")
    ap.add_argument("--results", default=os.path.join(HERE, "SWEEP.md"),
                    help="the markdown file written; results/sweep.json beside it is rewritten too (default: the "
                         "committed experiments/SWEEP.md and experiments/results/sweep.json)")
    a = ap.parse_args(argv)
    order = ("phases", "probe", "length", "oracle", "copy", "copy-variants", "ddpm", "use")          # length before the parts that read its runs
    given = {p for p in a.parts.split(",") if p}
    parts = [p for p in order if p in given]
    bad = given - set(order)
    if bad or not parts:
        ap.error(f"unknown parts {sorted(bad)}" if bad else "--parts names no part")
    try:
        lengths = sorted({int(s) for s in a.lengths.split(",")})
        ddpm_steps = sorted({int(s) for s in a.ddpm_steps.split(",")})
    except ValueError:
        ap.error(f"--lengths and --ddpm-steps must be comma lists of integers, got {a.lengths!r}, {a.ddpm_steps!r}")
    if min(lengths + ddpm_steps) < 1:
        ap.error("--lengths and --ddpm-steps must be positive")
    variants = [v for v in dict.fromkeys((a.variants or ("encoder,pages" if a.encoder_weights else "pages")).split(","))
                if v]
    if "copy-variants" in parts:
        if not variants or set(variants) - set(COPY_VARIANTS):
            ap.error(f"--variants must be a comma list of {', '.join(COPY_VARIANTS)}, got {a.variants!r}")
        if "encoder" in variants and not a.encoder_weights:
            ap.error("--variants encoder needs --encoder-weights (the claims run's trained encoder, "
                     "runs/claims/networks/tiny_dinov2_encoder_*.pth)")
    if a.encoder_weights:
        if not os.path.isfile(a.encoder_weights):
            ap.error(f"no encoder file at {a.encoder_weights}")
        try:
            encoders.from_checkpoint(a.encoder_weights)
        except Exception as e:                                  # noqa: BLE001 (any unreadable file: one line)
            ap.error(f"--encoder-weights {a.encoder_weights}: not a loadable encoder ({str(e).splitlines()[0][:200]})")
    if "length" not in parts:                           # the kept runs the ddpm / use parts read: there, loadable?
        needed = {max(lengths): "ddpm"} if "ddpm" in parts else {}
        needed.update({s: "use" for s in lengths if "use" in parts and s not in needed})
        for steps, part in sorted(needed.items()):
            keep = os.path.join(a.out, "length", f"ckpt_{steps}.pt")
            if not os.path.exists(keep):
                ap.error(f"--parts {part} needs the {steps}-step run ({keep}): run --parts length first")
            try:
                if semantica.read_checkpoint(keep).get("ema") is None:
                    raise ValueError("it holds no EMA weights")
            except (OSError, ValueError) as e:
                ap.error(f"{keep}: not a usable train.py checkpoint ({str(e).splitlines()[0][:200]})")
    for bad in (outputs.output_error("--out", a.out, folder=True), outputs.output_error("--results", a.results)):
        if bad:
            ap.error(bad)
    path = os.path.join(a.out, "sweep.json")
    committed = os.path.join(os.path.dirname(os.path.abspath(a.results)), "results", "sweep.json")
    res = {}
    for p in (committed, path):                         # the committed parts, then this folder's (newer)
        if os.path.exists(p):
            with open(p) as f:
                res.update(json.load(f))
    classifier = None
    if {"length", "oracle", "copy", "copy-variants", "ddpm"} & set(parts):
        classifier, rep = kinds.train_classifier(os.path.join(a.out, "networks"), log=log)
        log(f"kind classifier: held-out accuracy {rep['held_out_accuracy']:.3f}")
    for part in parts:
        t0 = time.time()
        if part == "phases":
            out = dict(results=phases(a.compile))
        elif part == "probe":
            out = probe(a.encoder_weights)
        elif part == "length":
            out = length(a.out, lengths, classifier, res.get("length", {}))
        elif part == "oracle":
            out = oracle_part(a.out, lengths, classifier, res.get("oracle", {}))
        elif part == "copy":
            out = copy_part(a.out, lengths, classifier, res.get("copy", {}))
        elif part == "copy-variants":
            out = copy_variants(a.out, lengths, classifier, res.get(part, {}), variants, a.encoder_weights)
        elif part == "ddpm":
            out = ddpm(a.out, lengths, classifier, ddpm_steps)
        else:
            out = use(a.out, lengths)
        command = "python experiments/sweep.py --parts " + part + \
            {"length": f" --lengths {a.lengths}", "oracle": f" --lengths {a.lengths}", "copy": f" --lengths {a.lengths}",
             "copy-variants": copy_variants_args(out) if part == "copy-variants" else "",   # every stored variant
             "ddpm": f" --lengths {a.lengths} --ddpm-steps {a.ddpm_steps}",
             "use": f" --lengths {a.lengths}",
             "phases": " --compile" if a.compile else "",
             "probe": f" --encoder-weights {shlex.quote(a.encoder_weights)}" if a.encoder_weights else ""}[part]
        command += "".join(f" --{k} {shlex.quote(v)}" for k, v, d in (("out", a.out, ap.get_default("out")),
                                                         ("results", a.results, ap.get_default("results"))) if v != d)
        prev = res.get(part, {}).get("seconds", 0) if part in ("length", "oracle", "copy", "copy-variants") else 0
        res[part] = dict(out, command=command, seconds=prev + time.time() - t0, machine=machine.describe())
        for p in (path, committed):
            os.makedirs(os.path.dirname(p), exist_ok=True)       # the second copy sits beside SWEEP.md
            with open(p + ".tmp", "w") as f:                     # (RESULTS.md quotes its length table)
                json.dump(res, f, indent=1)
            os.replace(p + ".tmp", p)
        write_markdown(res, a.results)
        log(f"{part}: done in {(time.time() - t0) / 60:.1f} min -> {a.results}")


if __name__ == "__main__":
    main()
