"""When does the reconstruction model copy its condition? sweep.py's copy and copy-variants parts (issue 20).

Semantica §4 (Fig. 2): a model trained on pairs (x, x) copies its condition, so its samples say nothing
new; claim 1 of the claims run (claims_setup.COPY_RATIO) is that this holds at small scale. Here the default
job's flags with `--pairs same` (the reconstruction model) are trained on to each length (kept_runs) and
sampled at guidance 0 for held-out conditions: pixel RMSE of a sample to its condition and between two
samples, and kind agreement (experiments/kinds.py). The copy-variants change one thing of the claims run's
reconstruction model at a time: its trained encoder, its 2048 pages, or that encoder's recipe stopped after
N steps (encoder<N>). Everything here is DESIGN.
"""
import os
import shlex
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import features  # noqa: E402  (experiments/features.py: the claims run's pretrained networks)
import kept_runs  # noqa: E402  (experiments/kept_runs.py: train.py runs kept per length)
import kinds  # noqa: E402  (experiments/kinds.py: the object-kind classifier)
import machine  # noqa: E402  (experiments/machine.py: the machine, in one line)
import semantica  # noqa: E402
import synthetic  # noqa: E402
from claims_setup import ClaimsConfig  # noqa: E402  (the claims run's setup)
from kept_runs import log  # noqa: E402

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
# them (DESIGN: which one keeps the claims run's model from copying at 4000 steps, README finding 7), and
# encoder<N> is the claims run's encoder recipe stopped after N of its steps (the issue's "encoder's training
# length" axis: between the random encoder, N = 0, and the claims run's, N = 250).
COPY_VARIANTS = {"encoder": "the claims run's trained encoder",
                 "pages": f"the claims run's {ClaimsConfig().train_pages} training pages",
                 "encoder<N>": "the claims run's encoder recipe trained N steps (features.pretrained_network)"}


def variant_steps(name):
    """N of a variant named encoder<N> (a non-negative integer), else None."""
    tail = name[len("encoder"):]
    return int(tail) if name.startswith("encoder") and tail.isdigit() else None


def variant_order(name):
    """Sort key of variant names: encoder, pages, then encoder<N> by N (the table's and the command's order)."""
    n = variant_steps(name)
    return (n is not None, n or 0, name)


def copy_variant_flags(name, encoder_weights=None, net_dir=None):
    """train.py flags that a copy variant adds to the reconstruction model's (`--pairs same`); an encoder<N>
    variant's encoder is trained here (or kept) in `net_dir`."""
    if name == "encoder":
        return ("--encoder-weights", encoder_weights)
    if variant_steps(name) is not None:
        cc = ClaimsConfig()
        return ("--encoder-weights", features.pretrained_network(net_dir, "encoder", variant_steps(name),
                                                                 cc.bank_pages, cc.seed, log=log))
    return ("--num-pages", str(ClaimsConfig().train_pages))


def copy_variants(out, lengths, classifier, state, names, encoder_weights=None):
    """The copy part's reconstruction model with one difference of the claims run's (COPY_VARIANTS) each, trained
    on to each length in OUT/copy-<name> and scored by copy_scores -> state["variants"][name] = {what, setting,
    rows: {steps: {train_seconds, machine, reconstruction}}}. A variant stored with another setting (another
    encoder file: its name is the hash of its recipe) is refused in one line."""
    variants = state.setdefault("variants", {})
    for v in variants.values():                               # rows stored before rows named their machine:
        for row in v["rows"].values():                       # the machine of the invocation that stored them
            row.setdefault("machine", state.get("machine", "?"))
    for name in names:
        n = variant_steps(name)
        flags = copy_variant_flags(name, encoder_weights, os.path.join(out, "networks"))
        setting = os.path.basename(flags[1]) if flags[0] == "--encoder-weights" else flags[1]
        v = variants.setdefault(name, dict(setting=setting, rows={}))
        v["what"] = (COPY_VARIANTS[name] if n is None else f"the claims run's encoder recipe trained {n} steps") + \
            (f" ({setting})" if flags[0] == "--encoder-weights" else "")
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


def copy_row(row, run, steps, flags, classifier, grid):
    """A reconstruction model (`--pairs same` plus `flags`) in `run` at `steps`: trained or kept (kept_run; the
    row's train_seconds kept when its checkpoint is), scored by copy_scores, its grid saved -> row (updated)."""
    if not os.path.exists(os.path.join(run, f"ckpt_{steps}.pt")) or "train_seconds" not in row:
        row["train_seconds"] = kept_runs.kept_run(run, steps, ("--pairs", "same", *flags))
    row["reconstruction"], cond, samples = copy_scores(
        semantica.Semantica.from_checkpoint(os.path.join(run, f"ckpt_{steps}.pt")), classifier)
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
