"""Judging Semantica's claims and writing RESULTS.md from a claims.py run's result dict.

The claims of experiments/claims.py (Semantica, arXiv 2405.14857: §4 / Fig. 2, §7 / Fig. 3, §8.2, App. C / Fig. 8,
§6.2 / App. D / Fig. 9), each judged against its criterion fixed before the run (claims_setup.py: COPY_RATIO,
RECALL_DROP, NOISE_SIGMAS), and the report: the claims table, setup, feature spaces, pair filter, per-setting and
guidance tables, object kind (experiments/kinds.py), FID against test-set size, the training seeds, sample grids,
runtime and what the run does not show. Reads results and samples only: no training or sampling.
"""
import os
import re
import sys
import urllib.parse

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from pages import images  # noqa: E402
import kinds  # noqa: E402  (experiments/kinds.py: the object-kind classifier)
from pages import synthetic  # noqa: E402
import uvit  # noqa: E402
from claims_setup import (COPY_RATIO, NOISE_SIGMAS, PRESETS, RECALL_DROP, SETTINGS, SWEEP,  # noqa: E402
                          TEST_COPY_RMSE, TEST_PAGES_SEED, W_ABLATION, ClaimsConfig, default_command, load_samples,
                          steps_suffix)


# ----------------------------------------------------------------------------- verdicts

def recall_std(recall, n):
    """Binomial std of a recall measured on n real images: sqrt(r (1 - r) / n) (DESIGN: the noise of
    a proportion, given the sample manifold; a bootstrap would duplicate points, which shrinks k-NN radii)."""
    return (max(recall * (1 - recall), 0.0) / n) ** 0.5


def _seq(v):
    return "[" + ", ".join(f"{x:.3f}" for x in v) + "]"


def _relation(a, b, tol=1e-9):
    return "=" if abs(a - b) <= tol else "<" if a < b else ">"


def _duplicates_note(n):
    return (f"; {n} test images are pixel-identical to another test image, which a copy of one also matches"
            if n else "")


def _verdict(ok):
    return "holds" if ok else "does not hold"


def judge(r, sweep, w_abl):
    """The four claims -> [{id, claim, verdict, summary}] from the result dict (feature-CNN space)."""
    E, ref, claims = r["evals"], r["real_reference"], []
    rec, pag = E[("reconstruction", "one_shot", 0.0)], E[(sweep, "one_shot", 0.0)]
    # near-copy: under half the page model's RMSE to the condition, and its samples closer to each other
    # than two real images of one page are
    ok = rec["pixel_to_cond"] < COPY_RATIO * pag["pixel_to_cond"] and rec["pixel_diversity"] < ref["pixel_diversity"]
    claims.append(dict(id="1", claim="§4 / Fig. 2: reconstruction samples are near-copies of the condition; "
                       "page-pair samples are not", verdict=_verdict(ok), numbers=dict(
        ratio=rec["pixel_to_cond"] / pag["pixel_to_cond"], diversity=rec["pixel_diversity"],
        real_diversity=ref["pixel_diversity"]), criterion=(
        f"at w = 0: reconstruction RMSE to the condition < {COPY_RATIO} x the page model's, and RMSE between "
        "its samples < RMSE between two real images of one page"), summary=(
        f"guidance 0, reconstruction vs {sweep}: pixel RMSE sample-to-condition {rec['pixel_to_cond']:.3f} vs "
        f"{pag['pixel_to_cond']:.3f} (ratio {rec['pixel_to_cond'] / pag['pixel_to_cond']:.2f}); RMSE between "
        f"samples of one condition {rec['pixel_diversity']:.3f} vs {pag['pixel_diversity']:.3f} (two real images "
        f"of one page: {ref['pixel_diversity']:.3f}); alignment {rec['alignment']:.3f} vs {pag['alignment']:.3f} "
        f"(two real images of one page: {ref['alignment']:.3f})")))
    ws, n = r["guidances"], r["config"]["test_pages"] * r["config"]["per_page"]   # N real images
    one = [E[(sweep, "one_shot", w)]["recall"] for w in ws]
    full = [E[(sweep, "full", w)]["recall"] for w in ws]
    noise = NOISE_SIGMAS * (recall_std(full[0], n) ** 2 + recall_std(full[-1], n) ** 2) ** 0.5
    ok = one[0] - one[-1] >= RECALL_DROP and full[0] - full[-1] <= noise
    claims.append(dict(id="2", claim="§7 / Fig. 3: as guidance rises, one-shot recall falls while full-set "
                       "recall does not fall", verdict=_verdict(ok), numbers=dict(
        one_shot_drop=one[0] - one[-1], full_drop=full[0] - full[-1], noise=noise), criterion=(
        f"one-shot recall falls by >= {RECALL_DROP} from w = {ws[0]} to w = {ws[-1]}; full-set recall falls by "
        f"no more than {NOISE_SIGMAS:g} binomial sigma"), summary=(
        f"{sweep}, guidance {ws[0]} -> {ws[-1]}: one-shot recall {one[0]:.3f} -> {one[-1]:.3f} (drop "
        f"{one[0] - one[-1]:.3f}), full-set recall {full[0]:.3f} -> {full[-1]:.3f} (drop {full[0] - full[-1]:.3f}, "
        f"noise {noise:.3f}) (all guidance values {ws}: one-shot {_seq(one)}, full set {_seq(full)})")))
    c = r["copy"]
    ok = abs(c["full"]["fid"]) < 1e-3 and c["full"]["recall"] == 1.0 and c["one_shot"]["recall"] <= c["k_over_n"] + 1e-9
    model_one = E[(sweep, "one_shot", w_abl)]["recall"]
    claims.append(dict(id="3", claim="§7: a copy model gets near-perfect full-set FID and recall and a "
                       "collapsing one-shot recall", verdict=_verdict(ok), numbers=dict(
        one_shot_recall=c["one_shot"]["recall"], k_over_n=c["k_over_n"]), criterion=(
        "copy model: full-set FID < 1e-3 and recall 1; one-shot recall <= K/N"), summary=(
        f"copy model: full-set FID {c['full']['fid']:.2g}, recall {c['full']['recall']:.3f}; one-shot recall "
        f"{c['one_shot']['recall']:.3f} ({_relation(c['one_shot']['recall'], c['k_over_n'])} K/N = {c['k_over_n']:.3f}"
        f"{_duplicates_note(c.get('duplicates', 0))}) vs {model_one:.3f} for {sweep} at w={w_abl}")))
    for cid, a, b, what in (("4a", sweep, "reconstruction", "§8.2 at our scale: page pairs beat reconstruction on "
                                                            "one-shot FID"),
                            ("4b", sweep, "pages", "App. C / Fig. 8 at our scale: filtering helps"),
                            ("4c", sweep, "pages+filter FiLM", "§6.2 / App. D / Fig. 9 at our scale: cross-attention "
                                                               "beats FiLM")):
        A, B = E[(a, "one_shot", w_abl)], E[(b, "one_shot", w_abl)]
        noise = NOISE_SIGMAS * (A["fid_std"] ** 2 + B["fid_std"] ** 2) ** 0.5
        ok = B["fid"] - A["fid"] > noise                                  # beyond 2 bootstrap sigma
        note = "" if ok else " (lower FID, within bootstrap noise)" if A["fid"] < B["fid"] else ""
        claims.append(dict(id=cid, claim=what, verdict=_verdict(ok) + note,
                           numbers=dict(gap=B["fid"] - A["fid"], noise=noise), criterion=(
            f"one-shot FID at w = {w_abl} lower by more than {NOISE_SIGMAS:g} bootstrap sigma"), summary=(
            f"one-shot FID at w={w_abl}: {a} {A['fid']:.2f} ± {A['fid_std']:.2f} vs {b} {B['fid']:.2f} ± "
            f"{B['fid_std']:.2f}")))
    return claims


# ----------------------------------------------------------------------------- RESULTS.md

def jsonable(x):
    if isinstance(x, dict):
        return {("|".join(map(str, k)) if isinstance(k, tuple) else str(k)): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def _copies_note(r):
    """--data: ' and the K training images that copy a test image (...)' (claims.copies_of_test)."""
    copies = r.get("train_copies_of_test")
    if copies is None:                                   # a results.json from before the check
        return ""
    return (f" and the {len(copies)} training image(s) that copy a test image as the model sees it (RMSE < "
            f"{TEST_COPY_RMSE} at {r['config']['size']} px, claims_setup.TEST_COPY_RMSE; listed in results.json)")


def _grids(r, folder, real_img, page, sweep, w_abl, rows=6):
    """Sample grids (save_grid layout) -> {caption: file name}."""
    os.makedirs(folder, exist_ok=True)
    E, out = r["evals"], {}
    pages = page.unique()[:rows].tolist()
    real_rows = torch.stack([real_img[page == p] for p in pages])
    images.save_grid(real_rows, os.path.join(folder, "test_pages.png"))
    out["Test pages (one row per page; never trained on)"] = "test_pages.png"

    def samples(name, proto, w):                                  # {cond index: its samples}, first rows
        img, cond = load_samples(E[(name, proto, w)]["samples_dir"], w, r["config"]["size"])
        by = {c: img[cond == c] for c in cond.unique().tolist()}
        return [c for c in by if int(page[c]) in pages][:rows], by

    conds, rec = samples("reconstruction", "one_shot", 0.0)
    _, pag = samples(sweep, "one_shot", 0.0)
    k = min(4, min(len(v) for v in rec.values()))
    fig2 = torch.stack([torch.cat([real_img[c][None], rec[c][:k], pag[c][:k]]) for c in conds])
    images.save_grid(fig2, os.path.join(folder, "fig2_reconstruction_vs_pages.png"))
    out[f"Fig. 2 layout, guidance 0: condition | {k} reconstruction samples | {k} {sweep} samples"] = \
        "fig2_reconstruction_vs_pages.png"
    for name in SETTINGS:
        conds, by = samples(name, "one_shot", w_abl)
        g = torch.stack([torch.cat([real_img[c][None], by[c]]) for c in conds])
        fname = f"oneshot_{name.replace(' ', '_').replace('+', '_')}.png"
        images.save_grid(g, os.path.join(folder, fname))
        out[f"One-shot samples, {name}, guidance {w_abl}: condition | its samples"] = fname
    cols = {w: samples(sweep, "one_shot", w)[1] for w in r["guidances"]}
    conds = list(cols[r["guidances"][0]])[:4]
    k = min(3, min(len(v) for v in cols[r["guidances"][0]].values()))
    g = torch.stack([torch.cat([real_img[c][None]] + [cols[w][c][:k] for w in r["guidances"]]) for c in conds])
    images.save_grid(g, os.path.join(folder, "fig3_guidance.png"))
    out[f"Guidance sweep ({sweep}): condition | {k} samples per guidance {r['guidances']}"] = "fig3_guidance.png"
    return out


def grids_folder(path):
    """The folder, beside the report at `path`, of its sample grids: results/ for a RESULTS.md, results-<name>/
    for RESULTS-<name>.md or <name>.md (so that RESULTS-gpu.md or RESULTS-steps2000.md never overwrite the grids
    that experiments/RESULTS.md shows)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return "results" if stem == "RESULTS" else "results-" + (stem[len("RESULTS-"):] if stem.startswith("RESULTS-")
                                                             else stem)


def other_lengths(path, preset):
    """The reports of `preset` at other training lengths beside the report at `path` -> [(file name, steps)],
    e.g. [("RESULTS-steps2000.md", 2000)] beside experiments/RESULTS.md and [("RESULTS.md", 500)] beside
    RESULTS-steps2000.md; [] when `path` is not named as claims.py names a report of `preset`."""
    base = "RESULTS" if preset == "full" else "RESULTS-" + preset
    name = re.compile(re.escape(base) + r"(?:-steps(\d+))?\.md")
    folder, me = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if not name.fullmatch(me) or not os.path.isdir(folder):
        return []
    found = [(f, name.fullmatch(f).group(1)) for f in sorted(os.listdir(folder)) if name.fullmatch(f) and f != me]
    return sorted(((f, int(n) if n else PRESETS[preset].steps) for f, n in found), key=lambda x: x[1])


def write_results(r, path, real_img, page):
    """RESULTS.md: setup, the two networks, the filter, per-setting tables, claims, grids, scale notes."""
    cc, E, sweep, w_abl = ClaimsConfig(**r["config"]), r["evals"], SWEEP, W_ABLATION
    sub = grids_folder(path)
    folder = os.path.join(os.path.dirname(os.path.abspath(path)), sub)
    grids = _grids(r, folder, real_img, page, sweep, w_abl)
    n = cc.test_pages * cc.per_page
    rewritten = f"; this report was rewritten from that run's results.json by {r['reported']}" if r.get("reported") else ""
    others = r.get("other_seeds") or []
    seeds = [cc.train_seed] + [o["seed"] for o in others]
    minutes = (r["timing"]["total"] + sum(o["seconds"] for o in others)) / 60
    length = f", {cc.steps} training steps" if steps_suffix(cc) else ""
    L = [f"# Semantica's claims at small scale ({cc.preset} run{length})", "",
         f"Generated by `{r.get('command') or default_command(cc, r['data'], seeds)}` in {minutes:.1f} min "
         f"{'(every training seed) ' if others else ''}"
         f"on {r.get('machine') or 'a machine its results.json does not name'}{_reuse_note(r)}. Seed {cc.seed}"
         f"{'' if seeds == [0] else ', training seed ' + str(cc.train_seed) + (' (the other seeds: Across training seeds)' if others else '')}; "
         f"every number below is regenerated by that command{rewritten}.", ""]
    link = lengths_line(path, cc.preset)
    L += [link, ""] if link else []
    if cc.preset.endswith("quick"):          # --quick, --profile gpu --quick: the pipeline's test, not a measurement
        L += [f"**A smoke run** ({cc.steps} training steps, {n} test images): it checks that the pipeline runs end "
              "to end; its verdicts and numbers say nothing about the claims.", ""]
    L += ["## Claims", "", "Criteria stated before the run (claims_setup.py: COPY_RATIO, RECALL_DROP, NOISE_SIGMAS).", "",
         "| # | claim | criterion | verdict | numbers |", "| --- | --- | --- | --- | --- |"]
    L += [f"| {c['id']} | {c['claim']} | {c['criterion']} | **{c['verdict']}** | {c['summary']} |" for c in r["claims"]]
    L += ["", "## Setup", "",
          f"- Denoiser: U-ViT `{cc.model}` (uvit.py), trained by `train.py` for {cc.steps} steps at batch "
          f"{cc.batch}, lr {cc.lr}, EMA decay {cc.ema_decay}; training pages: "
          f"{str(cc.train_pages) + ' synthetic (synthetic.SyntheticPages, seed ' + str(cc.train_seed) + ')' if r['data'] == 'synthetic' else r['data'] + ' minus the test pages' + _copies_note(r)}. "
          "The four settings share pages, seed and initialisation.",
          f"- Sampling: sample.py's K-shot evaluation, DDPM with {cc.sample_steps} steps (gamma 0.2), EMA weights. "
          f"Test set: {cc.test_pages} pages x {cc.per_page} images = N = {n} "
          f"({'seed ' + str(TEST_PAGES_SEED) + ', no outliers/duplicates' if r['data'] == 'synthetic' else r['test']}). "
          f"One-shot: K = {cc.test_pages} conditioning images (one per page, as one per class in §8.2), "
          f"{cc.per_page} samples each. Full set: every test image conditions one sample.",
          f"- Metrics (metrics.py): FID, precision/recall (k = 3), alignment = cosine(condition, sample), in the "
          f"feature CNN's 128-d space (`{r['feature_net']}`). ± = std over {cc.bootstrap} bootstrap resamples. "
          "Pixel RMSE on the [-1, 1] scale. FID values are only comparable at equal N.",
          f"- Frozen conditioning encoder: `{os.path.basename(r['encoder'])}` (DINOv2 file layout, loaded with "
          "encoders.from_checkpoint / train.py --encoder-weights).", ""]
    if r["data"] != "synthetic":
        L[-1:] = ["- With --data: the conditioning encoder, the feature CNN and the filter band are this script's own, "
                  "trained (pages/toy_encoder.py, features.py) and set (FILTER in claims_setup.py) on synthetic pages, not DINOv2 / Inception and the paper's "
                  "band: the numbers measure the pipeline on these pages, not the paper's setting (for that, train.py "
                  "--encoder-weights and sample.py --features inception).", ""]
    if r["spaces"]:
        L += ["## Why these feature spaces carry meaning", "",
              "Both networks are trained on held-out synthetic pages: the encoder (pages/toy_encoder.py, the default "
              "job's) SigLIP-style against the alt text of its images, the feature CNN (experiments/features.py) "
              "supervised on object kind + page identity (as Inception on ImageNet labels). On the test pages:", "",
              "| space | kind accuracy of the nearest image on another page | same-page retrieval@1 |",
              "| --- | --- | --- |"]
        L += [f"| {k} | {v['kind_acc_nn_other_page']:.3f} (chance {v['chance_kind']:.3f}) | {v['same_page_at_1']:.3f} |"
              for k, v in r["spaces"].items()]
        at1 = [v["same_page_at_1"] for v in r["spaces"].values()]
        L += ["", f"Same-page retrieval: encoder {at1[0]:.2f} vs {at1[1]:.2f} with random weights, feature CNN "
              f"{at1[2]:.2f} vs {at1[3]:.2f}. This is what the K-shot metrics need: a sample should land near the "
              "test images of its condition's page exactly when it shares their semantics (kind, palette, "
              "texture, background). Shape across pages is the weak part (the kind column); colour and texture "
              "dominate these spaces.", ""]
    if r["filter"]:
        f = r["filter"]
        L += ["## Pair filter (§5, App. C)", "",
              f"Thresholds [{f['low']}, {f['high']}] on the frozen encoder's CLS cosine (the paper's DINOv2 values are "
              "[0.3, 0.9]; the upper one is re-set for our encoder, see FILTER in claims_setup.py): "
              f"{f['pairs_before']} candidate pairs -> {f['pairs_after']} kept ({f['dropped_low']} below, "
              f"{f['dropped_high']} above). Histogram of pair similarities ('|' = kept band):", "", "```",
              f["histogram"], "```", ""]
    L += ["## One-shot results per setting (guidance %s)" % w_abl, "",
          "| setting | train loss | FID | precision | recall | alignment | RMSE to condition | RMSE between samples |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in SETTINGS:
        e = E[(name, "one_shot", w_abl)]
        L.append(f"| {name} | {r['runs'][name]['loss']:.4f} | {e['fid']:.2f} ± {e['fid_std']:.2f} | "
                 f"{e['precision']:.3f} | {e['recall']:.3f} | {e['alignment']:.3f} | {e['pixel_to_cond']:.3f} | "
                 f"{e['pixel_diversity']:.3f} |")
    c = r["copy"]
    for label, m in (("copy model, one-shot", c["one_shot"]), ("copy model, full set", c["full"])):
        L.append(f"| {label} | - | {m['fid']:.2f} | {m['precision']:.3f} | {m['recall']:.3f} | 1.000 | 0.000 | "
                 f"{'0.000' if 'one' in label else '-'} |")
    ref = r["real_reference"]
    L += [f"| two real images of one page | - | - | - | - | {ref['alignment']:.3f} | {ref['pixel_diversity']:.3f} | "
          f"{ref['pixel_diversity']:.3f} |", "",
          "The same metrics in the conditioning encoder's own space (sample.py's default `--features encoder`, "
          "as FD-DINOv2), as a cross-check:", "", "| setting | FID | precision | recall | alignment |",
          "| --- | --- | --- | --- | --- |"]
    for name in SETTINGS:
        e = r["encoder_space"][(name, "one_shot", w_abl)]
        L.append(f"| {name} | {e['fid']:.2f} | {e['precision']:.3f} | {e['recall']:.3f} | {e['alignment']:.3f} |")
    if r.get("classifier"):
        k = r["classifier"]
        L += ["", "## Do samples keep the condition's object kind?", "",
              f"A kind classifier (experiments/kinds.py: a 3-stage CNN trained on {k['train_images']} images of "
              f"held-out synthetic pages, {k['steps']} steps) reaches **{k['held_out_accuracy']:.3f}** accuracy on "
              f"{k['held_out_images']} images of other held-out pages (goal >= {kinds.GOAL_ACCURACY}; chance "
              f"{1 / len(synthetic.KINDS):.3f}). Agreement = the classifier names the same kind for a sample "
              "and its condition; relative accuracy = its accuracy on samples (against the condition's true "
              "kind) / its accuracy on the real test images.", "",
              "| setting | guidance | protocol | kind agreement | accuracy on samples | on real test images | relative |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
        for (name, proto, w), e in E.items():
            if "kind" in e:
                q = e["kind"]
                L.append(f"| {name} | {w} | {proto.replace('_', '-')} | {q['agreement']:.3f} | "
                         f"{q['sample_accuracy']:.3f} | {q['real_accuracy']:.3f} | {q['relative_accuracy']:.2f} |")
    L += ["", f"## Guidance sweep ({sweep}; Fig. 3)", "",
          "| guidance | one-shot FID | one-shot precision | one-shot recall | full-set FID | full-set precision | "
          "full-set recall | one-shot RMSE between samples |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for w in r["guidances"]:
        o, f = E[(sweep, "one_shot", w)], E[(sweep, "full", w)]
        L.append(f"| {w} | {o['fid']:.2f} | {o['precision']:.3f} | {o['recall']:.3f} | {f['fid']:.2f} | "
                 f"{f['precision']:.3f} | {f['recall']:.3f} | {o['pixel_diversity']:.3f} |")
    if r.get("fid_vs_n"):
        L += ["", f"## FID noise against test-set size ({sweep}, one-shot, guidance {w_abl})", "",
              "The same samples restricted to the first pages of the test set (nested subsets): how FID and its "
              "bootstrap std move with N tells how large a test set a difference between settings needs.",
              "", "| test pages | N real images | one-shot FID | bootstrap std |", "| --- | --- | --- | --- |"]
        L += [f"| {q['pages']} | {q['n']} | {q['fid']:.2f} | {q['fid_std']:.2f} |" for q in r["fid_vs_n"]]
    L += seeds_section(r, cc)
    L += ["", "## Sample grids", ""]
    # percent-encoded: a --results name with spaces still gives links CommonMark / GitHub render
    L += [f"{cap}:\n\n![{cap}]({urllib.parse.quote(f'{sub}/{fn}')})\n" for cap, fn in grids.items()]
    inv = r.get("invocation", {})
    hits, unrecorded = inv.get("reused", []), inv.get("unrecorded", [])
    L += ["## Runtime", "", "Seconds each phase took to compute; a phase the last invocation found in its --out cache "
          "counts with the time of the run that computed it (marked).", "", "| phase | seconds |", "| --- | --- |"]
    L += [f"| {k} | {v:.0f}{' (not recorded: reuse time)' if k in unrecorded else ' (cached)' if k in hits else ''} |"
          for k, v in r["timing"].items()]
    L += ["", "## What this does and does not show", "", SCALE_NOTES.format(n=n, model=cc.model, size=cc.size,
                                                                    params=round(_millions(cc.model), 1))]
    _write_atomic(path, "\n".join(L) + "\n")
    link_siblings(path, cc.preset)


def _write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


LENGTHS = "The same claims at other training lengths: "


def lengths_line(path, preset):
    """The header line linking the reports of `preset` at other training lengths beside `path`, or None."""
    siblings = other_lengths(path, preset)
    return LENGTHS + ", ".join(f"[{f}]({urllib.parse.quote(f)}) ({n} steps)" for f, n in siblings) + "." \
        if siblings else None


def link_siblings(path, preset):
    """Bring the other-lengths line of every report of `preset` beside `path` up to date (a new report at
    another length is linked from the existing ones at once, not when they are next rewritten). A file
    without a '## Claims' section is not a claims report and is left alone."""
    folder = os.path.dirname(os.path.abspath(path))
    for f, _ in other_lengths(path, preset):
        p = os.path.join(folder, f)
        with open(p) as fh:
            lines = fh.read().split("\n")
        if "## Claims" not in lines:
            continue
        at = next((i for i, x in enumerate(lines) if x.startswith(LENGTHS)), None)
        if at is not None:
            del lines[at:at + 2]                          # the line and its blank line
        link = lengths_line(p, preset)
        if link:
            at = lines.index("## Claims")
            lines[at:at] = [link, ""]
        _write_atomic(p, "\n".join(lines))


def _reuse_note(r):
    """Header text for a run that reused phases from its --out cache ('' for a run that computed all)."""
    inv = r.get("invocation", {})
    if not inv.get("reused"):
        return ""
    gap = f"; {len(inv['unrecorded'])} of them with no recorded computing time" if inv.get("unrecorded") else ""
    return (f" (the last invocation took {inv['seconds'] / 60:.1f} min and reused {len(inv['reused'])} phase(s) from "
            f"its --out cache{gap}: see Runtime)")


def seed_summary(r, out):
    """What the across-seeds section needs of one training seed's result (tuple eval keys, judged claims):
    {seed, out, seconds, claims, kind agreement and one-shot FID per setting}."""
    E = {name: r["evals"][(name, "one_shot", W_ABLATION)] for name in SETTINGS}
    return dict(seed=r["config"].get("train_seed", 0), out=out, seconds=r["timing"]["total"], claims=r["claims"],
                kind={name: e.get("kind", {}).get("agreement") for name, e in E.items()},
                fid={name: e.get("fid") for name, e in E.items()})


SEED_ROWS = (  # (claim id, number, what it is and its criterion, whether the claim's noise is its bound)
    ("1", "ratio", f"reconstruction RMSE to the condition / the page model's (< {COPY_RATIO})", False),
    ("2", "one_shot_drop", f"one-shot recall drop, lowest to highest w (>= {RECALL_DROP})", False),
    ("2", "full_drop", f"full-set recall drop (<= {NOISE_SIGMAS:g} binomial sigma, in brackets)", True),
    ("3", "one_shot_recall", "copy model's one-shot recall (<= K/N)", False),
    ("4a", "gap", f"one-shot FID reconstruction - pages+filter (> {NOISE_SIGMAS:g} bootstrap sigma, in brackets)", True),
    ("4b", "gap", f"one-shot FID pages - pages+filter (> {NOISE_SIGMAS:g} bootstrap sigma, in brackets)", True),
    ("4c", "gap", f"one-shot FID FiLM - cross-attention (> {NOISE_SIGMAS:g} bootstrap sigma, in brackets)", True),
)


def seeds_section(r, cc):
    """RESULTS.md lines: every claim's deciding number and verdict for each training seed (--train-seeds), with
    mean and std over seeds: the training variance that the criteria's test-set sigma leave out. [] for one seed."""
    rows = [seed_summary(r, None)] + list(r.get("other_seeds") or [])
    if len(rows) < 2:
        return []
    by_seed = [{c["id"]: c for c in q["claims"]} for q in rows]
    drawn = (f"a new draw of the {cc.train_pages} training pages, " if r.get("data", "synthetic") == "synthetic"
             else "the same training pages; ")
    L = ["", "## Across training seeds (--train-seeds)", "",
         f"The four denoisers trained again with train.py --seed {', '.join(str(q['seed']) for q in rows[1:])} ({drawn}"
         "initialisation, data order, pair draws, t and eps); test pages, encoder, "
         "metric networks, sampling noise and bootstrap stay those above, so the spread across seeds is training "
         "variance, which the criteria's sigma (test-set noise) do not contain. Each cell: the number that decides "
         "the claim, then the verdict of that seed (yes = holds).", "",
         "| claim | number (criterion) | " + " | ".join(f"seed {q['seed']}" for q in rows) + " | mean ± std |",
         "| --- | --- | " + "--- | " * len(rows) + "--- |"]
    for cid, key, what, bracket in SEED_ROWS:
        cells, vals = [], []
        for c in (b.get(cid) for b in by_seed):
            if c is None or key not in c.get("numbers", {}):
                cells.append("-")
                continue
            v = c["numbers"][key]
            vals.append(v)
            bound = f" ({c['numbers']['noise']:.3f})" if bracket else ""
            cells.append(f"{v:.3f}{bound} "
                         f"{'yes' if c['verdict'] == 'holds' else 'no'}")
        spread = f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}" if len(vals) > 1 else "-"
        L.append(f"| {cid} | {what} | " + " | ".join(cells) + f" | {spread} |")
    for what, key in (("FID", "fid"), ("kind agreement", "kind")):   # the settings' own numbers
        for name in SETTINGS:
            vals = [(q.get(key) or {}).get(name) for q in rows]    # (summaries stored before "fid" lack it)
            if all(v is not None for v in vals):
                L.append(f"| - | {what}, {name}, one-shot w = {W_ABLATION} | " + " | ".join(f"{v:.3f}" for v in vals)
                         + f" | {np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f} |")
    mixed = [cid for cid in dict.fromkeys(c for c, _, _, _ in SEED_ROWS)
             if len({b[cid]["verdict"] == "holds" for b in by_seed if cid in b}) > 1]
    L += ["", "Verdicts that change with the training seed: " + (", ".join(f"claim {c}" for c in mixed) if mixed else
          "none") + ". Computing time per seed: " + ", ".join(f"seed {q['seed']} {q['seconds'] / 60:.1f} min" for q in rows)
          + "."]
    return L


def _millions(preset):
    """Parameters of a U-ViT preset in millions (built on the meta device: no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in uvit.UViT(uvit.PRESETS[preset]).parameters()) / 1e6


SCALE_NOTES = """\
- Scale: a {params}M-parameter {size} px U-ViT ({model}) trained for minutes, a 4-block ViT encoder trained for ~13 minutes (once, committed), and
  N = {n} test images instead of SiD-B/L at 256 px, DINOv2-B/L, ~300K steps at batch 2048 and 10K-50K images.
  FID at N = {n} in a 128-d space has a large bias and noise (see the ± column); only differences well
  beyond the bootstrap noise mean something, and one training seed per setting is not an ablation.
- The ± and the criteria's sigma are test-set noise (bootstrap over test images, binomial for recall), not
  training variance: the same command on another CPU (AVX2 against AVX-512 kernels round differently) trains
  different models, and a claim near its threshold can change verdict between two such runs (docs/study.md
  compares two). `--train-seeds 0,1,2` measures that variance: the across-seeds section,
  when present, shows each claim's number and verdict for every training seed.
- Claim 3 is a property of the metrics (copies tie at distance 0, so one-shot recall is exactly K/N); it holds
  at any scale, on a test set without pixel-identical images (a copy also matches an image's duplicate). Claims 1, 2 and 4 are properties of trained models and can flip with training length.
- At larger scale: train.py and sample.py run directly (claims.py always uses its own small synthetic-page
  networks) on real page folders (--data), with official DINOv2 weights for the encoder (train.py
  --encoder-weights), Inception features (sample.py --features inception), 256 px presets, multi-GPU
  training (train.py under torchrun) and 10K-sample one-shot ImageNet (sample.py --few-shot 1 --per-group 10)
  would test the claims as the paper does; App. C's filter gain (>10 FID) and
  App. D's FiLM gap were measured after 100K+ steps, far beyond this run."""
