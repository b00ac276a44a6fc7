"""When does the reconstruction model copy its condition? sweep.py's copy and copy-variants parts (issue 20).

Semantica §4 (Fig. 2): a model trained on pairs (x, x) copies its condition, so its samples say nothing
new; claim 1 of the claims run (claims_setup.COPY_RATIO) is that this holds at small scale. Here the default
job's flags with `--pairs same` (the reconstruction model) are trained on to each length (kept_runs) and
sampled at guidance 0 for held-out conditions: pixel RMSE of a sample to its condition and between two
samples, and kind agreement (experiments/kinds.py). The copy-variants change one thing of the claims run's
reconstruction model at a time: its trained encoder, its 2048 pages, or that encoder's recipe stopped after
N steps (encoder<N>); and the encoder's patch size P, so its token count and what each token must carry
(patch<P>: the random encoder at P; encoder<N>-patch<P>). A `-centred` suffix tests STUDY.md finding 7's reading
causally: the same encoder, but each image's mean patch token subtracted from its patch tokens (centre_patches),
so none of their variance is shared by every position; train.py reads those tokens from a precomputed
conditioning cache (§3.2, centred_cache). Everything here is DESIGN.
"""
import json
import os
import re
import shlex
import shutil
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from pages import embeddings  # noqa: E402
import encoders  # noqa: E402
import features  # noqa: E402  (experiments/features.py: the claims run's pretrained networks)
import kept_runs  # noqa: E402  (experiments/kept_runs.py: train.py runs kept per length)
import kinds  # noqa: E402  (experiments/kinds.py: the object-kind classifier)
import machine  # noqa: E402  (experiments/machine.py: the machine, in one line)
import oracle  # noqa: E402  (experiments/oracle.py: JOB, the default job's pages)
import semantica  # noqa: E402
from pages import synthetic  # noqa: E402
from claims_setup import ClaimsConfig  # noqa: E402  (the claims run's setup)
from kept_runs import log  # noqa: E402

COPY_EVAL = dict(pages=48, n=2, guidance=0.0, steps=64)   # claim 1 is judged at guidance 0 (claims_setup)


def pixel_rmse(a, b):
    """Per-image pixel RMSE of (N, 3, S, S) images on the [-1, 1] scale -> (N,), as claims.score."""
    return (a - b).flatten(1).square().mean(1).sqrt()


def copy_scores(model, classifier, ev=COPY_EVAL, seed=0, transform=None):
    """Claim 1's numbers for one model: `ev["n"]` samples at guidance ev["guidance"] of one condition per
    held-out test page (kinds.test_conditions) -> (dict(to_cond = mean pixel RMSE sample-to-condition,
    between = mean RMSE between two samples of one condition, agreement = kind agreement), cond, samples).
    Pixel RMSE per image on the [-1, 1] scale, as claims.score. `transform`: tokens (B, T, D) -> (B, T, D), the
    conditioning transform the model was trained with (its tokens rounded to float16, as the cache stores them)."""
    cond, kind = kinds.test_conditions(ev["pages"], model.net.config.image_size)
    if transform is None:
        given = dict(cond_images=cond)
    else:
        with torch.no_grad():
            given = dict(cond=transform(model.condition(cond)).half().float())
    samples = model.sample(**given, num_samples=ev["n"], guidance=ev["guidance"], steps=ev["steps"], seed=seed)
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
# them (DESIGN: which one keeps the claims run's model from copying at 4000 steps, STUDY.md finding 7). The
# encoder-recipe variants walk the encoder axes from the copy part's random encoder (N = 0, P = 4):
# encoder<N> is the claims run's encoder recipe stopped after N of its steps (the claims run's is N = 250),
# patch<P> the random encoder at patch size P ((32 / P)^2 patch tokens, each a P x P x 3 patch in 128 dims:
# P = 8 must compress 192 pixel values, P = 2 only 12), encoder<N>-patch<P> both; <recipe>-centred the same
# encoder with its patch tokens centred on the image's mean patch token (centre_patches).
COPY_VARIANTS = {"encoder": "the claims run's trained encoder",
                 "pages": f"the claims run's {ClaimsConfig().train_pages} training pages",
                 "encoder<N>": "the claims run's encoder recipe trained N steps (features.pretrained_network)",
                 "patch<P>": "the random encoder at patch size P (P divides 32; the copy part's is 4)",
                 "encoder<N>-patch<P>": "the encoder recipe trained N steps at patch size P",
                 "<recipe>-centred": "one of the three above, its patch tokens centred on the image's mean patch token"}
NUMBER = r"(0|[1-9][0-9]*)"                                 # no leading zeros: one name per variant (its folder)
RECIPE = re.compile(rf"(?:encoder{NUMBER}(?:-patch{NUMBER})?|patch{NUMBER})(-centred)?")


def variant_recipe(name):
    """(N steps, patch size P, centred) of an encoder-recipe variant: encoder<N> -> (N, 4, False), patch<P> ->
    (0, P, False), encoder<N>-patch<P> -> (N, P, False), any of them + "-centred" -> (..., True); None for
    another name. P is not checked here (features.tiny_config is)."""
    m = RECIPE.fullmatch(name)
    if m is None:
        return None
    patch = m[2] or m[3]
    return int(m[1] or 0), int(patch) if patch else features.TINY.patch_size, m[4] is not None


def variant_order(name):
    """Sort key of variant names: encoder, pages, then the recipes at patch 4 by N, then by patch size and N, each
    centred one after its uncentred one (the table's and the command's order)."""
    r = variant_recipe(name)
    return (r is not None,) + ((r[1] != features.TINY.patch_size, r[1], r[0], r[2]) if r else (False, 0, 0, False)) + (name,)


def variant_what(name, setting):
    """What an encoder-recipe variant is, for the table: '<recipe> (<file>)'."""
    n, p, centred = variant_recipe(name)
    tokens = f"{features.tiny_config(p).num_patches} patch tokens"
    what = (f"the claims run's encoder recipe trained {n} steps" if n else "the random encoder") + \
        ("" if p == features.TINY.patch_size else f", patch size {p} ({tokens})") + \
        (", patch tokens centred on the image's mean patch token" if centred else "")
    return f"{what} ({setting})"


def centre_patches(tokens, patches):
    """Tokens (B, T, D) whose last `patches` are patch tokens -> (B, T, D) with the image's mean patch token
    subtracted from each of them (the CLS and register tokens as they are).

    DESIGN: the causal test of STUDY.md finding 7's reading. After centring, no patch-token variance is shared by
    every position (token_probe.position_shared_share = 0, up to rounding); what is position-specific, the
    layout, is left exactly as it was, and the image's summary stays in the CLS token."""
    patch = tokens[:, -patches:]
    return torch.cat([tokens[:, :-patches], patch - patch.mean(1, keepdim=True)], 1)


def centred_cache(net_dir, encoder_path, num_pages=oracle.JOB["num_pages"], seed=oracle.JOB["seed"]):
    """The conditioning cache (embeddings.encode_cache, §3.2) of the copy runs' training pages (train.py's
    synthetic pages of --num-pages / --seed at 32 px) under the encoder `encoder_path`, with centre_patches
    applied to every image's tokens -> its folder in `net_dir` (built once, atomically: a half-built cache is
    never left under the final name). Its meta.json records the transform; train.py --cond-cache checks the
    cache against the pages and the encoder as it does any cache, and reads these tokens instead of the
    encoder's."""
    path = os.path.join(net_dir, f"cache-centred-{os.path.splitext(os.path.basename(encoder_path))[0]}-"
                                 f"{num_pages}p-seed{seed}")
    if os.path.exists(os.path.join(path, "meta.json")):
        return path
    encoder = encoders.from_checkpoint(encoder_path)
    pages = synthetic.SyntheticPages(num_pages, encoder.image_size, seed=seed)      # as train.py's data.open_pages
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    embeddings.encode_cache(pages, encoder, tmp)
    tokens = np.load(os.path.join(tmp, "tokens.npy"), mmap_mode="r+")
    patches = encoder.num_patches
    for s in range(0, len(tokens), 1024):
        tokens[s:s + 1024] = centre_patches(torch.from_numpy(np.array(tokens[s:s + 1024], np.float32)), patches).numpy()
    tokens.flush()
    with open(os.path.join(tmp, "meta.json")) as f:
        meta = json.load(f)
    meta["transform"] = "copying.centre_patches: the image's mean patch token subtracted from its patch tokens"
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f)
    os.replace(tmp, path)
    return path


def variant_transform(name):
    """The conditioning transform an encoder-recipe variant trains with (tokens -> tokens), else None."""
    r = variant_recipe(name)
    if not (r and r[2]):
        return None
    patches = features.tiny_config(r[1]).num_patches
    return lambda tokens: centre_patches(tokens, patches)


def copy_variant_flags(name, encoder_weights=None, net_dir=None):
    """train.py flags that a copy variant adds to the reconstruction model's (`--pairs same`); an encoder-recipe
    variant's encoder is trained here (or kept) in `net_dir`, and a centred one's conditioning cache built there
    (centred_cache). ValueError for a patch size that does not fit."""
    if name == "encoder":
        return ("--encoder-weights", encoder_weights)
    recipe = variant_recipe(name)
    if recipe is not None:
        cc, (n, p, centred) = ClaimsConfig(), recipe
        path = features.pretrained_network(net_dir, "encoder", n, cc.bank_pages, cc.seed, log=log, patch_size=p)
        # another patch size is no preset: train.py builds it from the file (encoders.from_checkpoint)
        return ("--encoder-weights", path) + (() if p == features.TINY.patch_size else ("--encoder", "dinov2-custom")) + \
            (("--cond-cache", centred_cache(net_dir, path)) if centred else ())
    return ("--num-pages", str(ClaimsConfig().train_pages))


def copy_variants(out, lengths, classifier, state, names, encoder_weights=None):
    """The copy part's reconstruction model with one difference of the claims run's (COPY_VARIANTS) each, trained
    on to each length in OUT/copy-<name> and scored by copy_scores -> state["variants"][name] = {what, setting,
    rows: {steps: {train_seconds, machine, reconstruction}}}. A variant stored with another setting (another
    encoder file: its name is the hash of its recipe) is refused in one line."""
    variants = state.setdefault("variants", {})
    for v in variants.values():                               # rows stored before rows named their machine:
        for row in v["rows"].values():                        # the machine of the invocation that stored them
            row.setdefault("machine", state.get("machine", "?"))
    for name in names:
        flags = copy_variant_flags(name, encoder_weights, os.path.join(out, "networks"))
        setting = os.path.basename(flags[1]) if flags[0] == "--encoder-weights" else flags[1]
        v = variants.setdefault(name, dict(setting=setting, rows={}))
        v["what"] = variant_what(name, setting) if variant_recipe(name) else \
            COPY_VARIANTS[name] + (f" ({setting})" if flags[0] == "--encoder-weights" else "")
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
                                                   os.path.join(out, f"copy-{name}_{steps}.png"), variant_transform(name))
            row["machine"] = machine.describe()
            log(f"copy variant {name} {steps}: {row}")
    return state


def copy_variants_args(state):
    """copy-variants' flags in the command that measures every stored variant at every stored length (several
    invocations, e.g. --variants encoder then --variants pages, fill one table)."""
    v = state["variants"]
    lengths = sorted({int(s) for x in v.values() for s in x["rows"]})
    args = f" --lengths {','.join(map(str, lengths))} --variants {','.join(sorted(v, key=variant_order))}"
    if "encoder" in v:
        args += f" --encoder-weights {shlex.quote(v['encoder'].get('weights') or v['encoder']['setting'])}"
    return args


def copy_row(row, run, steps, flags, classifier, grid, transform=None):
    """A reconstruction model (`--pairs same` plus `flags`) in `run` at `steps`: trained or kept (kept_run; the
    row's train_seconds kept when its checkpoint is), scored by copy_scores (with the conditioning `transform`
    it trained with), its grid saved -> row (updated)."""
    if not os.path.exists(os.path.join(run, f"ckpt_{steps}.pt")) or "train_seconds" not in row:
        row["train_seconds"] = kept_runs.kept_run(run, steps, ("--pairs", "same", *flags))
    row["reconstruction"], cond, samples = copy_scores(
        semantica.Semantica.from_checkpoint(os.path.join(run, f"ckpt_{steps}.pt")), classifier, transform=transform)
    kept_runs.save_grid(cond, samples, grid)
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
