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
          claims encoder too when --encoder-weights names it, and the claims' encoder recipe trained each of
          --encoder-steps, and the random encoder at each patch size of --encoder-patches); and is it
          prominent there? The same pixel regression from only the tokens' top
          principal components (the low-rank probe), and how much of their variance every position shares
          (experiments/token_probe.py).
  length  the default job's flags trained on (train.py, resumed) to each of --lengths steps; at each length
          the kind agreement of its variations (experiments/kinds.py) and a grid of them.
  oracle  the encoder or the denoiser? The default job with an oracle condition whose tokens carry the
          condition's true object kind (experiments/oracle.py), trained to each of --lengths steps and scored
          like the length part; with the use part's loss measure of the kind (its own kind's vector against
          another kind's on the same tokens).
  copy    claim 1 against training length: the default job with --pairs same (§4's reconstruction model)
          trained to each of --lengths steps; at guidance 0 its samples' pixel RMSE to their condition and to
          each other, against two real images of one page and the length part's page-pair model
          (experiments/copying.py, with copy-variants).
  copy-variants  which difference keeps the claims run's reconstruction model from copying: the copy part's
          model with the claims run's trained encoder (--encoder-weights), or with its 2048 training pages, or
          with that encoder's recipe stopped after N steps (encoder<N>), or with the random encoder at another
          patch size P, i.e. another token count (patch<P>; encoder<N>-patch<P> both), or any of those with its
          patch tokens centred on the image's mean patch token (<recipe>-centred: the causal test of the
          position-shared reading), one at a time (--variants), trained to each of --lengths steps and scored
          like the copy part.
  ddpm    the longest run's kind agreement against the number of DDPM steps at evaluation.
  use     does the denoiser read its condition? Each length's diffusion loss (Eq. 1, eps space) at fixed noise
          levels t on held-out page pairs with the true condition, another page's condition, and the null:
          a model that ignores its condition scores the three alike.

    python experiments/sweep.py                              # every part -> experiments/SWEEP.md
    python experiments/sweep.py --parts phases,probe          # some parts (the others are kept from sweep.json)

Each part is stored in OUT/sweep.json with its command, wall time and machine; checkpoints are kept per
length (experiments/kept_runs.py: OUT/length/ckpt_<L>.pt, OUT/copy/ckpt_<L>.pt, OUT/copy-<variant>/ckpt_<L>.pt;
OUT/oracle/state_<L>.pt; encoders in OUT/networks), so a rerun measures only what is missing. Everything is
DESIGN.
"""
import argparse
import json
import os
import shlex
import shutil
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import copying  # noqa: E402  (experiments/copying.py: the copy and copy-variants parts)
import data  # noqa: E402
import diffusion  # noqa: E402
import encoders  # noqa: E402
import features  # noqa: E402  (experiments/features.py: the encoder recipe's patch sizes)
import kinds  # noqa: E402  (experiments/kinds.py: the object-kind classifier)
import machine  # noqa: E402  (experiments/machine.py: the machine, in one line)
import oracle  # noqa: E402  (experiments/oracle.py: the oracle-condition run)
import outputs  # noqa: E402  (experiments/outputs.py: output paths refused in one line)
import semantica  # noqa: E402
from pages import synthetic  # noqa: E402
import token_probe  # noqa: E402  (experiments/token_probe.py: the probe part)
import uvit  # noqa: E402
from claims_setup import COPY_RATIO, ClaimsConfig  # noqa: E402  (claim 1's criterion; the claims run's setup)
from kept_runs import final_loss, log, save_grid, train_kept  # noqa: E402  (experiments/kept_runs.py)

EVAL = dict(pages=48, n=2, guidance=0.5, steps=64)   # kind agreement: 96 samples (binomial std <= 0.05)


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


# ----------------------------------------------------------------------------- length and DDPM steps

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
    held-out page pairs (target image 1, condition image 0 of pages of seed token_probe.PROBE_PAGES_SEED), with the same
    t and noise under three conditions -> {t: {"true", "shuffled" (the previous page's condition), "null",
    "gap" (shuffled - true), "gap_se" (its standard error over `chunks` equal chunks of the pairs)}}.
    kind_vectors (K, D): an oracle-condition model (experiments/oracle.py): "true" is the condition's tokens
    plus e_k of its kind k, "shuffled" the same tokens plus e_(k+1 mod K), another kind's vector."""
    if n % chunks:
        raise ValueError(f"n ({n}) must be a multiple of chunks ({chunks})")
    size = model.config.image_size
    pages = synthetic.SyntheticPages(n, size, seed=token_probe.PROBE_PAGES_SEED)
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
        if "lowrank" in p:
            ranks = [k for k in next(iter(p["lowrank"].values())) if k.isdigit()]
            lines += ["### Is the condition's layout prominent in the tokens? (low-rank probe)", "",
                      "The same pixel regression from only the top-k principal components of the tokens (centred, "
                      "not standardised: the directions of their largest variance, as the encoder emits them); in "
                      "brackets the share of the tokens' variance those k components carry. A full-rank probe "
                      "weighs every direction alike; this one asks whether the condition's pixels sit in the "
                      "tokens' dominant directions, which a denoiser meets first. The all-dims column is the "
                      "full probe (as above); on raw pixels it is the probe's own floor with this many training "
                      "images, not 0. The mean-colour and pooled-image rows are references: what the condition's "
                      "palette alone (3 numbers) and its coarse layout (48) determine. Last column: the share of the "
                      "patch tokens' variance across images that is the same at every position (the image's mean "
                      "token); the rest is position-specific, the layout (1/64 for the 64 patch positions at patch size 4 "
                      "if positions were independent, 1/16 at patch size 8). Local probe: each patch's pixels from its "
                      "own patch token alone, one linear map shared by all positions (token_probe.local_fit_eval): "
                      "whether a token holds its own patch, the simplest thing a copying denoiser can read.", "",
                      "| features (dims) | all dims | " + " | ".join(f"top {k}" for k in ranks) +
                      " | variance shared by all positions | local probe: own patch from own token |",
                      "| --- | --- | " + " | ".join("---" for _ in ranks) + " | --- | --- |"]
            for k, v in p["lowrank"].items():
                lines += [f"| {k} ({v['dims']}) | {v['full']:.3f} | " + " | ".join(
                    f"{v[r]['pixel_rmse']:.3f} ({v[r]['variance_share']:.2f})" if r in v else "-" for r in ranks) +
                    (f" | {v['position_shared']:.2f} |" if "position_shared" in v else " | - |") +
                    (f" {v['local']:.3f} |" if "local" in v else " - |")]
            lines += [""]
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
        p, ev = res["copy"], copying.COPY_EVAL
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
                  "at a time, scored as in the copy part (guidance 0); encoder<N> variants swap in the claims run's "
                  "encoder recipe stopped after N of its steps (the claims run's is N = "
                  f"{ClaimsConfig().encoder_steps}; the random encoder is N = 0); patch<P> variants the random encoder at "
                  "patch size P (the copy part's is 4: 8 x 8 patch tokens; P = 8 gives 4 x 4 tokens, each a 8 x 8 x 3 "
                  "patch in 128 dims); -centred variants train and sample on the same encoder's tokens with the image's "
                  "mean patch token subtracted from every patch token (copying.centre_patches: no patch-token variance "
                  "is shared by all positions; the layout and the CLS token unchanged). Training seconds: since the previous "
                  "kept length of that run, on the machine named in the row (its CPU; the part's lines give the rest). "
                  "Grids: `copy-<variant>_<steps>.png` in the work folder.", "",
                  "| steps x batch 32 | run | training seconds (machine) | RMSE to condition | RMSE between samples | "
                  "kind agreement |", "| --- | --- | --- | --- | --- | --- |"]
        runs = [("copy part (random encoder)", {k: dict(r, machine=r.get("machine", res["copy"].get("machine", "?")))
                                                for k, r in base.items()})] + [
            (f"{name}: {p['variants'][name]['what']}", p["variants"][name]["rows"])
            for name in sorted(p["variants"], key=copying.variant_order)]
        for s in sorted({int(k) for _, rows in runs[1:] for k in rows}):
            for label, rows in runs:
                if str(s) in rows:
                    r = rows[str(s)]
                    rec = r["reconstruction"]
                    where = r.get("machine", p.get("machine", "?")).split(",")[0]
                    lines += [f"| {s} | {label} | {r.get('train_seconds', '-')} ({where}) | {rec['to_cond']:.3f} | "
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
    ap.add_argument("--encoder-steps", default="",
                    help="probe: also the claims run's encoder recipe (experiments/features.py) trained each of these "
                         "comma-listed step counts, kept in OUT/networks (the claims run's: 250; 0 steps is the random "
                         "encoder's row; default: none)")
    ap.add_argument("--encoder-patches", default="",
                    help="probe: also the random tiny encoder at each of these comma-listed patch sizes P (dividing 32; "
                         "4 is the default job's), i.e. other token counts: (32/P)^2 patch tokens, as the patch<P> "
                         "copy variants (default: none)")
    ap.add_argument("--variants",
                    help="copy-variants: comma list of the reconstruction model's variants, each with one difference of "
                         "the claims run's: " + "; ".join(f"{k}: {v}" for k, v in copying.COPY_VARIANTS.items()) +
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
        encoder_steps = sorted({int(s) for s in a.encoder_steps.split(",") if s})
        patches = sorted({int(s) for s in a.encoder_patches.split(",") if s})
    except ValueError:
        ap.error(f"--lengths, --ddpm-steps, --encoder-steps and --encoder-patches must be comma lists of integers, "
                 f"got {a.lengths!r}, {a.ddpm_steps!r}, {a.encoder_steps!r}, {a.encoder_patches!r}")
    if min(lengths + ddpm_steps + [s + 1 for s in encoder_steps]) < 1:
        ap.error("--lengths and --ddpm-steps must be positive, --encoder-steps not negative")
    try:
        for p in patches:
            features.tiny_config(p)
    except ValueError as e:
        ap.error(f"--encoder-patches: {e}")
    variants = [v for v in dict.fromkeys((a.variants or ("encoder,pages" if a.encoder_weights else "pages")).split(","))
                if v]
    if "copy-variants" in parts:
        if not variants or any(v not in ("encoder", "pages") and copying.variant_recipe(v) is None for v in variants):
            ap.error(f"--variants must be a comma list of {', '.join(copying.COPY_VARIANTS)} (N a number of steps, "
                     f"P a patch size), got {a.variants!r}")
        try:
            for v in variants:
                if copying.variant_recipe(v):
                    features.tiny_config(copying.variant_recipe(v)[1])
        except ValueError as e:
            ap.error(f"--variants {v}: {e}")
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
            out = token_probe.probe(a.encoder_weights, encoder_steps, os.path.join(a.out, "networks"), log=log,
                                    patches=patches)
        elif part == "length":
            out = length(a.out, lengths, classifier, res.get("length", {}))
        elif part == "oracle":
            out = oracle_part(a.out, lengths, classifier, res.get("oracle", {}))
        elif part == "copy":
            out = copying.copy_part(a.out, lengths, classifier, res.get("copy", {}))
        elif part == "copy-variants":
            out = copying.copy_variants(a.out, lengths, classifier, res.get(part, {}), variants, a.encoder_weights)
        elif part == "ddpm":
            out = ddpm(a.out, lengths, classifier, ddpm_steps)
        else:
            out = use(a.out, lengths)
        command = "python experiments/sweep.py --parts " + part + \
            {"length": f" --lengths {a.lengths}", "oracle": f" --lengths {a.lengths}", "copy": f" --lengths {a.lengths}",
             "copy-variants": copying.copy_variants_args(out) if part == "copy-variants" else "",   # every stored variant
             "ddpm": f" --lengths {a.lengths} --ddpm-steps {a.ddpm_steps}",
             "use": f" --lengths {a.lengths}",
             "phases": " --compile" if a.compile else "",
             "probe": (f" --encoder-weights {shlex.quote(a.encoder_weights)}" if a.encoder_weights else "") +
                      (f" --encoder-steps {','.join(map(str, encoder_steps))}" if encoder_steps else "") +
                      (f" --encoder-patches {','.join(map(str, patches))}" if patches else "")}[part]
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
