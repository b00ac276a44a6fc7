"""Which pairs of a page train Semantica (§5, App. C): candidate pairs, the similarity band, the filter.

Semantica trains on pairs of images from one web page (Eq. 3, §5) and keeps a pair when the cosine of the
frozen encoder's global embeddings of condition and target lies in [low, high] (App. C: DINOv2 [0.3, 0.9]:
0.3 removes unrelated images, 0.9 near duplicates; CLIP/SigLIP lower 0.65). This module is that selection
alone, on embeddings already computed, so the folder path (data.build_pairs) and the sharded pass
(shards.filter_shards) run the SAME code and agree pair for pair.
`pages` is any object with len() and .count(p) (data.FilePages, synthetic.SyntheticPages, shards.ShardPages);
embeddings are rows in page order: row g = image i of page p, g = sum(count(q) for q < p) + i.
Left out: the manual inspection of samples that set the thresholds (App. C).
"""
import importlib.util
import logging

import numpy as np
import torch

import encoders

log = logging.getLogger("semantica.pairs")

MAX_PAIRS_PER_PAGE = 64  # DESIGN: cap on candidate ordered pairs per page before filtering
FILTER_DEFAULTS = {  # encoder family -> (low, high) on cos(global_cond, global_target)
    "dinov2": (0.3, 0.9),   # App. C: 0.3 removes unrelated images, 0.9 near duplicates
    "siglip": (0.65, 0.9),  # App. C: lower 0.65 ("CLIP"; Fig. 8 right is SigLIP); INTERPRETATION: upper 0.9
    "clip": (0.65, 0.9),    # App. C: "a lower threshold of 0.65 for CLIP"; INTERPRETATION: upper 0.9 (not given)
    "mae": (0.3, 0.9),      # INTERPRETATION: App. E gives no band for MAE; DINOv2's (both self-supervised ViTs)
}  # App. C's rule for a new encoder: move `low` until about as many pairs pass as with DINOv2 (`scan --encoder`)
HISTOGRAM_RANGE = (-1.0, 1.0)  # cosine similarities; Fig. 8 plots them on this axis


def filter_band(encoder_name):
    """Default (low, high) of an encoder preset (its family's; other names read as "<family>-...").
    ValueError for a family without an App. C band."""
    config = encoders.ENCODER_PRESETS.get(encoder_name)
    family = config.family if config is not None else str(encoder_name).split("-")[0]
    if family not in FILTER_DEFAULTS:
        raise ValueError(f"no default filter band for encoder {encoder_name!r} (family {family!r}; known: "
                         f"{sorted(FILTER_DEFAULTS)}); give low/high explicitly")
    return FILTER_DEFAULTS[family]


def check_band(low, high):
    """ValueError unless -1 <= low < high <= 1 (finite): the band of cosines a pair must lie in (§5, App. C).
    low = -1 and high = 1 is "no filter"; an inverted or empty band would keep nothing and count pairs twice."""
    try:
        ok = all(-1 <= float(v) <= 1 for v in (low, high)) and float(low) < float(high)   # NaN: False
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"filter band [{low}, {high}]: need -1 <= low < high <= 1 (-1 and 1 = no filter)")


def candidate_pairs(pages, max_pairs_per_page=MAX_PAIRS_PER_PAGE, page_ids=None):
    """All ordered (page, cond_idx, target_idx) pairs with cond != target within each page (Eq. 3); pages
    with more contribute a random subset of max_pairs_per_page (DESIGN), seeded by the page number alone
    (page_ids[p], default p): the filter is a property of the data, not of a run, so the folder path and the
    sharded pass keep the same subset whatever --seed either was given. -> LongTensor (P, 3)."""
    rows = [np.zeros((0, 3), np.int64)]
    for p in range(len(pages)):
        c, t = np.nonzero(~np.eye(pages.count(p), dtype=bool))
        if len(c) > max_pairs_per_page:
            page_seed = p if page_ids is None else int(page_ids[p])
            keep = np.sort(np.random.default_rng(page_seed).choice(len(c), max_pairs_per_page, replace=False))
            c, t = c[keep], t[keep]
        rows.append(np.stack([np.full_like(c, p), c, t], 1))
    return torch.from_numpy(np.concatenate(rows)).long()


def cosine(emb_cond, emb_target):
    """Row-wise cosine similarity (P,) in float64 of (P, D) embeddings (need not be normalised)."""
    a, b = emb_cond.double(), emb_target.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)


def filter_pairs(emb_cond, emb_target, low, high):
    """§5, App. C: keep a pair when low <= cos(global_cond, global_target) <= high. -> bool (P,).
    ValueError for a band check_band refuses."""
    check_band(low, high)
    cos = cosine(emb_cond, emb_target)
    return (cos >= low) & (cos <= high)


def select_pairs(pages, emb, valid, low, high, max_pairs_per_page=MAX_PAIRS_PER_PAGE, page_ids=None):
    """§5 filter on precomputed global embeddings: emb (N, D) (any float dtype), valid (N,) bool, rows in page
    order -> (kept LongTensor (K, 3) of (page, cond, target), counts dict, cos (M,) float64 of the M
    candidate pairs whose images both decoded). Pairs touching an undecodable image are dropped (`unreadable`).
    ValueError for a band check_band refuses."""
    check_band(low, high)
    cand = candidate_pairs(pages, max_pairs_per_page, page_ids)
    offsets = torch.tensor(np.cumsum([0] + [pages.count(p) for p in range(len(pages))]))
    ci, ti = offsets[cand[:, 0]] + cand[:, 1], offsets[cand[:, 0]] + cand[:, 2]
    ok, cos = valid[ci] & valid[ti], cosine(emb[ci], emb[ti])
    keep = filter_pairs(emb[ci], emb[ti], low, high) & ok
    counts = {"low": low, "high": high, "pairs_before": len(cand), "pairs_after": int(keep.sum()),
              "dropped_low": int(((cos < low) & ok).sum()), "dropped_high": int(((cos > high) & ok).sum()),
              "unreadable": int((~ok).sum())}
    return cand[keep], counts, cos[ok]


def histogram_counts(cos, bins=20):
    """Counts (bins,) int64 of similarities over HISTOGRAM_RANGE: what histogram_text draws, summable over shards."""
    return np.histogram(np.asarray(cos, dtype=np.float64), bins=bins, range=HISTOGRAM_RANGE)[0]


def histogram_text(cos, low, high, bins=20, width=40, counts=None):
    """Text histogram of pair similarities over [-1, 1] (Fig. 8 centre/right), the band marked with '|'.
    `counts` (bins,) replaces `cos` when the similarities were counted elsewhere (summed over shards)."""
    counts = histogram_counts(cos, bins) if counts is None else np.asarray(counts)
    edges = np.linspace(*HISTOGRAM_RANGE, len(counts) + 1)
    top = max(1, counts.max())
    return "\n".join(f"{e0:+.2f}..{e1:+.2f} {'|' if low <= (e0 + e1) / 2 <= high else ' '} "
                     f"{'#' * int(round(width * c / top)):<{width}} {c}" for c, e0, e1 in zip(counts, edges, edges[1:]))


def histogram_png(path, counts, low, high, encoder_name):
    """Fig. 8-style PNG of counts (bins,) over [-1, 1] with the band's edges dashed -> path, or None (and a
    logged warning) when matplotlib (optional extra [plots]) is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        log.warning("no histogram PNG %s: matplotlib is not installed (pip install matplotlib)", path)
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    edges = np.linspace(*HISTOGRAM_RANGE, len(counts) + 1)
    fig = plt.figure(figsize=(5, 3))
    plt.stairs(counts, edges, fill=True)
    for x in (low, high):
        plt.axvline(x, color="k", ls="--")
    plt.xlabel(f"cosine similarity ({encoder_name})")
    plt.ylabel("pairs")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
