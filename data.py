"""Web-page image pairs for Semantica: sources, robust loading, pair filtering, synthetic pages, loader.

Semantica (arXiv 2405.14857) trains on *image episodes*: a conditioning image and a target image drawn
from the same web page (Eq. 3, §5). The reconstruction baseline conditions on the target itself
(Eq. 2, §4), and the label-grouped baseline pairs images of the same class (§8.3), which is the same
layout as web pages with class folders as "pages". Pairs are filtered by the cosine similarity of the
frozen encoder's global embeddings, keeping low <= cos <= high (§5, App. C). Encoder outputs are
frozen, so they can be precomputed once (§3.2).

Sources ("pages" objects, all with len(), .count(p), .image(p, i, size), .key(p, i), .label(p)):
  - folder    ROOT/<page>/<image>            (ImageNet class folders give the label-grouped baseline)
  - manifest  CSV or JSONL with `page` and `path` columns, paths relative to the manifest's folder
  - synthetic SyntheticPages: procedural "web pages" made on the fly from (seed, page, index)

A batch from make_loader is (cond, target): target (B, 3, S, S) float in [-1, 1]; cond is the
conditioning image (B, 3, S, S) or, with a conditioning cache, the cached encoder output (B, T, D) or
(B, D) as float32. Loading is by steps, not epochs: the index stream is infinite, sharded per rank.

Shapes: B batch, S training resolution, T tokens, D encoder width, N images or pairs.
Left out: tar shards (distributed.md §5.2 sketches them), multi-image conditioning, the paper's
manual inspection that set the thresholds (App. C), and any web crawling.
"""
import argparse
import csv
import hashlib
import json
import logging
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageOps

log = logging.getLogger("semantica.data")

FILTER_DEFAULTS = {
    "dinov2": (0.3, 0.9),   # App. C: 0.3 removes unrelated images, 0.9 removes near duplicates
    "siglip": (0.65, 0.9),  # App. C: lower 0.65 ("CLIP"); INTERPRETATION: upper 0.9 as for DINOv2 (not given)
}
MAX_PIXELS = Image.MAX_IMAGE_PIXELS   # DESIGN: Pillow's decompression-bomb limit (~89.5 Mpx), checked before decoding
MAX_PAIRS_PER_PAGE = 64               # DESIGN: cap on candidate ordered pairs per page before filtering


# ----------------------------------------------------------------------------- robust image loading

def to_rgb(im):
    """Any decodable PIL image -> 8-bit RGB (EXIF orientation applied, alpha composited on white)."""
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I") or im.mode == "F":          # 16-bit / 32-bit grayscale -> 8 bit
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or a.max() > 255:  # 0..65535 -> 0..255 ("I"/"F" range is unknown)
            a = a / 257.0
        im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return im.convert("RGB")                             # L, P, CMYK, YCbCr, ... -> RGB


def open_checked(path, max_pixels=MAX_PIXELS):
    """Open lazily (header only) and refuse empty files and decompression bombs; raises with a reason."""
    if os.path.getsize(path) == 0:
        raise ValueError("empty file")
    im = Image.open(path)
    if im.width * im.height > max_pixels:
        im.close()
        raise ValueError(f"decompression bomb: {im.width}x{im.height} > {max_pixels} pixels")
    return im


def resize_crop(im, size):
    """Resize the shorter side to `size` (bicubic, antialiased), centre crop -> float (3, size, size) in [-1, 1]."""
    w, h = im.size
    s = size / min(w, h)
    w2, h2 = max(size, round(w * s)), max(size, round(h * s))
    im = im.resize((w2, h2), Image.BICUBIC)
    left, top = (w2 - size) // 2, (h2 - size) // 2
    im = im.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
    return x.float() / 127.5 - 1.0


def load_image(path, size, max_pixels=MAX_PIXELS):
    """Decode one file to (3, size, size) in [-1, 1]; raises (OSError, ValueError, ...) naming the reason."""
    with open_checked(path, max_pixels) as im:
        im.load()                                        # a truncated file raises here
        return resize_crop(to_rgb(im), size)


def check_image(path, decode=False, max_pixels=MAX_PIXELS):
    """Cheap validity check for scanning: None if usable, else the reason a file is skipped."""
    try:
        with open_checked(path, max_pixels) as im:
            if decode:
                im.load()
                to_rgb(im)
            else:
                im.verify()                              # structure/CRC check without decoding pixels
    except Exception as e:                               # any decoder error is a skip reason, never a crash
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return None


def iter_images(paths, size=None, max_pixels=MAX_PIXELS):
    """Yield (3, size, size) tensors in [-1, 1] for the readable files of `paths` (e.g. metrics'
    folders); unreadable ones are logged and skipped. size=None: the first readable image's shorter side."""
    for path in paths:
        try:
            with open_checked(path, max_pixels) as im:
                im.load()
                im = to_rgb(im)
                size = size or min(im.size)
                yield resize_crop(im, size)
        except Exception as e:
            log.warning("skipping %s: %s: %s", path, type(e).__name__, e)


# ----------------------------------------------------------------------------- file sources

def _read_manifest(path):
    """Rows of a CSV or JSONL manifest -> [(page, absolute path)], paths relative to the manifest folder."""
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="") as f:
        if path.endswith((".jsonl", ".json")):
            rows = [json.loads(line) for line in f if line.strip()]
        else:
            rows = list(csv.DictReader(f))
    for n, r in enumerate(rows):
        if "page" not in r or "path" not in r:
            raise ValueError(f"{path}: row {n + 1} needs `page` and `path` columns, got {sorted(r)}")
    return [(str(r["page"]), os.path.join(base, r["path"])) for r in rows]


def scan(source, decode=False, max_pixels=MAX_PIXELS, **synthetic_kwargs):
    """Index a source -> (pages {page: [image keys]}, skipped {path: reason}).

    `source`: a folder ROOT/<page>/<image>, a .csv/.jsonl manifest, or "synthetic" (keys are
    "synthetic:<page>:<index>"; synthetic_kwargs go to SyntheticPages). Files are validated cheaply
    (header + verify; `decode=True` decodes fully, which also catches truncated JPEGs). Pages keep
    their sorted image order; singleton pages are kept here and dropped by PagePairs in "page" mode.
    """
    if source == "synthetic":
        pages = SyntheticPages(**synthetic_kwargs)
        return {str(p): [pages.key(p, i) for i in range(pages.count(p))] for p in range(len(pages))}, {}
    if os.path.isdir(source):
        entries = []
        for page in sorted(os.listdir(source)):
            d = os.path.join(source, page)
            if os.path.isdir(d) and not page.startswith("."):
                entries += [(page, os.path.join(d, f)) for f in sorted(os.listdir(d)) if not f.startswith(".")]
            elif not page.startswith("."):
                entries.append((None, d))               # a file outside any page folder
    elif os.path.isfile(source):
        entries = _read_manifest(source)
    else:
        raise FileNotFoundError(f"{source}: not a folder, a manifest file or 'synthetic'")
    pages, skipped = {}, {}
    for page, path in entries:
        if page is None or not os.path.isfile(path):
            reason = "not inside a page folder" if page is None else "missing file (or not a file)"
        else:
            reason = check_image(path, decode, max_pixels)
        if reason:
            skipped[path] = reason
            log.warning("skipping %s: %s", path, reason)
        else:
            pages.setdefault(page, []).append(path)
    return pages, skipped


class FilePages:
    """Scanned image files grouped by page; `.image` decodes on demand (raises on a bad file)."""

    def __init__(self, pages, image_size, max_pixels=MAX_PIXELS):
        self.names = list(pages)
        self.files = [list(pages[n]) for n in self.names]
        self.image_size, self.max_pixels = image_size, max_pixels

    def __len__(self):
        return len(self.names)

    def count(self, page):
        return len(self.files[page])

    def key(self, page, index):
        return self.files[page][index]

    def label(self, page):
        return self.names[page]                          # class folder name for label-grouped data (§8.3)

    def image(self, page, index, size=None):
        return load_image(self.files[page][index], size or self.image_size, self.max_pixels)

    def fingerprint(self):
        """Changes whenever a file is added, removed or rewritten (size, mtime)."""
        h = hashlib.sha1()
        for files in self.files:
            for f in files:
                st = os.stat(f)
                h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()


def open_pages(source, image_size, decode=False, **synthetic_kwargs):
    """scan + wrap: -> (pages object, skipped). "synthetic" gives SyntheticPages at `image_size`."""
    if source == "synthetic":
        return SyntheticPages(image_size=image_size, **synthetic_kwargs), {}
    pages, skipped = scan(source, decode)
    if not pages:
        raise ValueError(f"{source}: no usable images ({len(skipped)} skipped)")
    return FilePages(pages, image_size), skipped


# ----------------------------------------------------------------------------- synthetic web pages

KINDS = ("circle", "square", "triangle", "star", "ring", "cross", "crescent", "hexagon")
TEXTURES = ("solid", "stripes", "dots", "two-tone", "shaded")


def _shape_sdf(kind, u, v):
    """Signed distance (approx., object radius 1) of shape `kind` at local coordinates u, v."""
    r = np.sqrt(u * u + v * v)
    if kind == "circle":
        return r - 1.0
    if kind == "square":
        return np.maximum(abs(u), abs(v)) - 0.8
    if kind == "triangle":
        return np.maximum(np.maximum(0.866 * u + 0.5 * v, -0.866 * u + 0.5 * v), -v) - 0.5
    if kind == "star":
        a = (np.arctan2(v, u) * 5 / (2 * np.pi)) % 1.0
        return r - (0.45 + 0.55 * abs(2 * a - 1) ** 2)   # 5 points
    if kind == "ring":
        return abs(r - 0.72) - 0.28
    if kind == "cross":
        return np.minimum(np.maximum(abs(u) - 0.3, abs(v) - 0.95), np.maximum(abs(u) - 0.95, abs(v) - 0.3))
    if kind == "crescent":
        return np.maximum(r - 1.0, 0.8 - np.sqrt((u - 0.45) ** 2 + v * v))
    angles = np.arange(6) * np.pi / 3                    # hexagon
    return np.max(np.cos(angles)[:, None, None] * u + np.sin(angles)[:, None, None] * v, axis=0) - 0.87


def _hsv(h, s, v):
    """HSV in [0,1] -> RGB array in [0,1]."""
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


class SyntheticPages:
    """Deterministic procedural "web pages" (DESIGN: a stand-in for Episodic WebLI, §5).

    A page shares semantics across its images: object kind (one of KINDS, `.label(page)`), a colour
    palette, a texture and a background family. Images of a page vary in pose (rotation), scale,
    position, object count, background and lighting. Like real pages, a fraction of images is
    unrelated (`p_outlier`, a random other kind/palette) or a near duplicate of the page's first
    image (`p_duplicate`): what the low/high similarity filter of §5 removes. Every image is made
    from (seed, page, index) alone, so workers and ranks agree without sharing state. All defaults are
    DESIGN choices (no paper source): pages and resolution sized for CPU runs of the tiny preset.
    """

    def __init__(self, num_pages=2000, image_size=32, seed=0, images_per_page=(2, 8), p_outlier=0.1,
                 p_duplicate=0.05):
        self.num_pages, self.image_size, self.seed = num_pages, image_size, seed
        self.images_per_page, self.p_outlier, self.p_duplicate = images_per_page, p_outlier, p_duplicate

    def __len__(self):
        return self.num_pages

    def _page_style(self, page):
        rng = np.random.default_rng([self.seed, page, 0])
        lo, hi = self.images_per_page
        return dict(count=int(rng.integers(lo, hi + 1)), kind=int(rng.integers(len(KINDS))),
                    hue=rng.random(), hue2=rng.random(), texture=int(rng.integers(len(TEXTURES))),
                    bg_hue=rng.random(), bg_dark=bool(rng.random() < 0.3), max_objects=int(rng.integers(1, 4)))

    def count(self, page):
        return self._page_style(page)["count"]

    def label(self, page):
        return self._page_style(page)["kind"]

    def key(self, page, index):
        return f"synthetic:{page}:{index}"

    def fingerprint(self):
        return f"synthetic-v1:{self.seed}:{self.num_pages}:{self.images_per_page}:{self.p_outlier}:{self.p_duplicate}"

    def image(self, page, index, size=None):
        """(3, size, size) float in [-1, 1] for image `index` of `page`."""
        style = self._page_style(page)
        rng = np.random.default_rng([self.seed, page, index + 1])
        roll = rng.random()
        if index > 0 and roll < self.p_duplicate:        # near duplicate: page image 0, slightly relit
            return (self.image(page, 0, size) * (0.95 + 0.1 * rng.random())).clamp(-1, 1)
        if roll > 1 - self.p_outlier:                    # unrelated image on the page
            style = self._page_style(int(rng.integers(1 << 30)) + self.num_pages)
        return torch.from_numpy(self._render(style, rng, size or self.image_size))

    def _render(self, st, rng, size):
        y, x = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size * 2 - 1   # pixel centres in [-1, 1]
        # background: the page's hue family, a random two-colour linear gradient per image
        a = rng.uniform(0, 2 * np.pi)
        g = (np.cos(a) * x + np.sin(a) * y + 1) / 2
        val = (0.15, 0.35) if st["bg_dark"] else (0.75, 0.95)
        c1 = _hsv((st["bg_hue"] + rng.normal(0, 0.05)) % 1, rng.uniform(0.1, 0.4), rng.uniform(*val))
        c2 = _hsv((st["bg_hue"] + rng.normal(0, 0.05)) % 1, rng.uniform(0.1, 0.4), rng.uniform(*val))
        img = c1[:, None, None] * (1 - g) + c2[:, None, None] * g                      # (3, S, S)
        col1 = _hsv((st["hue"] + rng.normal(0, 0.03)) % 1, rng.uniform(0.6, 0.95), rng.uniform(0.6, 0.95))
        col2 = _hsv((st["hue2"] + rng.normal(0, 0.03)) % 1, rng.uniform(0.5, 0.9), rng.uniform(0.3, 0.7))
        n = int(rng.integers(1, st["max_objects"] + 1))
        for _ in range(n):
            scale = rng.uniform(0.35, 0.6) / np.sqrt(n)
            cx, cy = rng.uniform(-0.9 + scale, 0.9 - scale, size=2)
            th = rng.uniform(0, 2 * np.pi)
            u = (np.cos(th) * (x - cx) + np.sin(th) * (y - cy)) / scale   # rotate + scale into shape coords
            v = (-np.sin(th) * (x - cx) + np.cos(th) * (y - cy)) / scale
            sdf = _shape_sdf(KINDS[st["kind"]], u, v) * scale * size / 2  # in pixels
            mask = np.clip(0.5 - sdf, 0, 1)                                # antialiased edge
            outline = np.clip(1.0 - abs(sdf + 0.5), 0, 1) * 0.5
            tex = TEXTURES[st["texture"]]
            if tex == "stripes":
                t = (np.sin(u * 7) > 0).astype(np.float32)
            elif tex == "dots":
                t = ((np.sin(u * 9) * np.sin(v * 9)) > 0.3).astype(np.float32)
            elif tex == "two-tone":
                t = (v > 0).astype(np.float32)
            elif tex == "shaded":
                t = np.clip((u + v + 1.5) / 3, 0, 1)
            else:
                t = np.zeros_like(u)
            obj = col1[:, None, None] * (1 - t) + col2[:, None, None] * t
            obj = obj * (1 - outline)                                      # darker rim
            img = img * (1 - mask) + obj * mask
        la = rng.uniform(0, 2 * np.pi)                                     # lighting: level + direction
        img = img * rng.uniform(0.75, 1.15) * (1 + rng.uniform(0, 0.25) * (np.cos(la) * x + np.sin(la) * y))
        return (np.clip(img, 0, 1) * 2 - 1).astype(np.float32)

    def write(self, out, size=None):
        """Write OUT/page<p>/<i>.png (a folder source that scan() reads back)."""
        for p in range(len(self)):
            d = os.path.join(out, f"page{p:06d}")
            os.makedirs(d, exist_ok=True)
            for i in range(self.count(p)):
                save_png(self.image(p, i, size), os.path.join(d, f"{i:02d}.png"))


def save_png(x, path):
    """(3, H, W) or (B, 3, H, W) in [-1, 1] -> PNG (a batch becomes one row)."""
    x = x if x.dim() == 3 else torch.cat(list(x), dim=2)
    a = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(a).save(path)


# ----------------------------------------------------------------------------- frozen encoder passes

def _all_images(pages):
    return [(p, i) for p in range(len(pages)) for i in range(pages.count(p))]


def _encoder_fingerprint(encoder):
    """Name + a cheap hash of the weights (first values of every tensor), so new weights miss the cache."""
    h = hashlib.sha1(f"{encoder.name}|{encoder.image_size}".encode())
    for name, t in encoder.state_dict().items():
        h.update(name.encode() + t.flatten()[:1024].float().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def encode_all(pages, fn, size, batch_size=64, device="cpu", path=None):
    """fn(images (B, 3, size, size) on `device`) -> (B, ...) for every image, in page order.

    -> (float16 array (N, ...), valid bool (N,)); the array is a .npy memmap at `path` when given, so
    token caches larger than memory stream to disk. Images that fail to load are logged, zero-filled
    and marked invalid.
    """
    items, out, valid = _all_images(pages), None, np.zeros(sum(map(pages.count, range(len(pages)))), bool)
    for s in range(0, len(items), batch_size):
        imgs = []
        for k, (p, i) in enumerate(items[s:s + batch_size]):
            try:
                imgs.append(pages.image(p, i, size))
                valid[s + k] = True
            except Exception as e:
                log.warning("skipping %s: %s: %s", pages.key(p, i), type(e).__name__, e)
                imgs.append(torch.zeros(3, size, size))
        y = fn(torch.stack(imgs).to(device)).float().cpu().numpy()
        if out is None:
            shape = (len(items),) + y.shape[1:]
            out = np.zeros(shape, np.float16) if path is None else \
                np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)
        out[s:s + len(y)] = y
    return out, valid


def cached_embeddings(pages, encoder, cache_dir, batch_size=64):
    """Global embeddings (N, D) float16 of every image (§5), cached on disk under `cache_dir`.

    The cache file name hashes the encoder (name, weights) and the file list with sizes and mtimes, so
    changed files or weights recompute. Images are loaded at encoder.image_size and go through
    encoder.preprocess (its official eval preprocessing). Written atomically (tmp + rename).
    """
    key = hashlib.sha1(f"{_encoder_fingerprint(encoder)}|{pages.fingerprint()}".encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"emb-{encoder.name}-{key}.npz")
    if os.path.exists(path):
        z = np.load(path)
        return torch.from_numpy(z["emb"]), torch.from_numpy(z["valid"])
    device = next(encoder.parameters()).device
    emb, valid = encode_all(pages, lambda x: encoder(encoder.preprocess(x))[0], encoder.image_size,
                            batch_size, device)
    os.makedirs(cache_dir, exist_ok=True)
    np.savez(path + ".tmp.npz", emb=emb, valid=valid)
    os.replace(path + ".tmp.npz", path)
    return torch.from_numpy(emb), torch.from_numpy(valid)


def cache_conditioning(pages, condition_fn, path, tag="", batch_size=64, device="cpu"):
    """Frozen representations (§3.2): condition_fn(images at training size) for every image (e.g.
    Semantica.condition: tokens (T, D) or a global (D,)), stored as a float16 .npy memmap at `path`.
    `path`.json (written last, so an interrupted run recomputes) holds the fingerprint of the files,
    `tag` (name the encoder/weights here) and the size; the cache is reused while they match."""
    meta = {"fingerprint": pages.fingerprint(), "tag": tag, "size": pages.image_size}
    if os.path.exists(path) and os.path.exists(path + ".json"):
        with open(path + ".json") as f:
            if json.load(f)["meta"] == meta:
                return path
        os.remove(path + ".json")
    cond, valid = encode_all(pages, condition_fn, pages.image_size, batch_size, device, path=path)
    cond.flush()
    with open(path + ".json", "w") as f:
        json.dump({"meta": meta, "valid": valid.tolist()}, f)
    return path


# ----------------------------------------------------------------------------- pair filtering (§5, App. C)

def candidate_pairs(pages, max_pairs_per_page=MAX_PAIRS_PER_PAGE, seed=0):
    """All ordered (page, cond_idx, target_idx) pairs with cond != target within each page; pages with
    more than max_pairs_per_page ordered pairs contribute a seeded random subset of that many
    (DESIGN: bounds the cost of huge pages). -> LongTensor (P, 3)."""
    rows = []
    for p in range(len(pages)):
        n = pages.count(p)
        c, t = np.nonzero(~np.eye(n, dtype=bool))
        if len(c) > max_pairs_per_page:
            keep = np.sort(np.random.default_rng([seed, p]).choice(len(c), max_pairs_per_page, replace=False))
            c, t = c[keep], t[keep]
        rows.append(np.stack([np.full_like(c, p), c, t], 1))
    return torch.from_numpy(np.concatenate(rows) if rows else np.zeros((0, 3), np.int64)).long()


def cosine(emb_cond, emb_target):
    """Row-wise cosine similarity in float64 (inputs need not be normalised)."""
    a, b = emb_cond.double(), emb_target.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)


def filter_pairs(emb_cond, emb_target, low, high):
    """Keep a pair when low <= cos(global_cond, global_target) <= high (§5, App. C). -> bool (P,)."""
    cos = cosine(emb_cond, emb_target)
    return (cos >= low) & (cos <= high)


def histogram_text(cos, low, high, bins=20, width=40):
    """Text histogram of pair similarities over [-1, 1] (Fig. 8 centre/right), the band marked with '|'."""
    counts, edges = np.histogram(cos.numpy(), bins=bins, range=(-1, 1))
    lines, top = [], max(1, counts.max())
    for c, e0, e1 in zip(counts, edges[:-1], edges[1:]):
        mark = "|" if low <= (e0 + e1) / 2 <= high else " "
        lines.append(f"{e0:+.2f}..{e1:+.2f} {mark} {'#' * int(round(width * c / top)):<{width}} {c}")
    return "\n".join(lines)


def build_pairs(pages, encoder, cache_dir, low=None, high=None, max_pairs_per_page=MAX_PAIRS_PER_PAGE,
                seed=0, histogram_png=None):
    """Filtered (page, cond, target) pairs for "page" mode -> (pairs LongTensor (K, 3), report dict).

    low/high default to FILTER_DEFAULTS[encoder.family]. Pairs touching an image that failed to
    decode are dropped too (counted as `unreadable`).
    """
    low = FILTER_DEFAULTS[encoder.family][0] if low is None else low
    high = FILTER_DEFAULTS[encoder.family][1] if high is None else high
    emb, valid = cached_embeddings(pages, encoder, cache_dir)
    cand = candidate_pairs(pages, max_pairs_per_page, seed)
    offsets = torch.tensor(np.cumsum([0] + [pages.count(p) for p in range(len(pages))]))
    ci, ti = offsets[cand[:, 0]] + cand[:, 1], offsets[cand[:, 0]] + cand[:, 2]
    ok = valid[ci] & valid[ti]
    cos = cosine(emb[ci], emb[ti])
    keep = filter_pairs(emb[ci], emb[ti], low, high) & ok
    report = {"encoder": encoder.name, "low": low, "high": high, "pairs_before": len(cand),
              "pairs_after": int(keep.sum()), "dropped_low": int(((cos < low) & ok).sum()),
              "dropped_high": int(((cos > high) & ok).sum()), "unreadable": int((~ok).sum()),
              "histogram": histogram_text(cos[ok], low, high)}
    if histogram_png:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            plt.figure(figsize=(5, 3))
            plt.hist(cos[ok].numpy(), bins=50, range=(-1, 1))
            plt.axvline(low, color="k", ls="--")
            plt.axvline(high, color="k", ls="--")
            plt.xlabel(f"cosine similarity ({encoder.name})")
            plt.ylabel("pairs")
            plt.tight_layout()
            plt.savefig(histogram_png)
            plt.close()
            report["histogram_png"] = histogram_png
        except ImportError:
            log.info("matplotlib not installed: no histogram PNG (text histogram only)")
    return cand[keep], report


# ----------------------------------------------------------------------------- pair dataset + loader

class PagePairs(torch.utils.data.Dataset):
    """Map-style (cond, target) pairs, deterministic in (seed, index).

    mode "page" (Eq. 3, §5): without `pairs`, item k takes page k % len from the pages with >= 2
    images (singletons dropped, counted in .dropped_pages) and draws two distinct images with an RNG
    seeded by (seed, k), so index k + len gives a new pair of the same page; with `pairs` (from
    build_pairs), item k is pairs[k % len]. mode "same" (Eq. 2, §4): item k is image k % len, and
    cond is the target. `cond_cache` (cache_conditioning path) returns the cached cond instead of
    the image. An image that fails to load is logged and the item is replaced by a deterministic
    other item (never a crash mid-run; RuntimeError after 10 failures in a row).
    """

    def __init__(self, pages, mode="page", pairs=None, seed=0, cond_cache=None):
        assert mode in ("page", "same"), f"mode must be 'page' or 'same', got {mode!r}"
        assert pairs is None or mode == "page", "filtered pairs only apply to mode='page'"
        self.pages, self.mode, self.pairs, self.seed, self.cond_cache = pages, mode, pairs, seed, cond_cache
        counts = [pages.count(p) for p in range(len(pages))]
        self.offsets = np.cumsum([0] + counts)
        self.multi = np.array([p for p, n in enumerate(counts) if n >= 2], dtype=np.int64)
        self.dropped_pages = len(counts) - len(self.multi) if mode == "page" else 0
        if self.dropped_pages:
            log.info("page mode: dropped %d pages with fewer than two images", self.dropped_pages)
        self.images = np.array([(p, i) for p, n in enumerate(counts) for i in range(n)], dtype=np.int64)
        self._cond, self._bad = None, set()
        n = len(self)
        if n == 0:
            raise ValueError(f"no training items in mode {mode!r} ({self.dropped_pages} singleton pages dropped)")

    def __len__(self):
        if self.mode == "same":
            return len(self.images)
        return len(self.pairs) if self.pairs is not None else len(self.multi)

    def pair(self, index):
        """-> (page, cond_idx, target_idx) for item `index` (any non-negative int)."""
        if self.mode == "same":
            p, i = self.images[index % len(self.images)]
            return int(p), int(i), int(i)
        if self.pairs is not None:
            return tuple(int(v) for v in self.pairs[index % len(self.pairs)])
        p = int(self.multi[index % len(self.multi)])
        c, t = np.random.default_rng([self.seed, index]).choice(self.pages.count(p), 2, replace=False)
        return p, int(c), int(t)

    def _load_cond(self, p, c):
        if self.cond_cache is None:
            return self.pages.image(p, c)
        if self._cond is None:                           # opened lazily: each DataLoader worker maps the file
            self._cond = np.load(self.cond_cache, mmap_mode="r")
            with open(self.cond_cache + ".json") as f:
                self._valid = json.load(f)["valid"]
        g = int(self.offsets[p] + c)
        if not self._valid[g]:
            raise ValueError("no cached conditioning (image failed to encode)")
        return torch.from_numpy(np.array(self._cond[g], dtype=np.float32))

    def __getitem__(self, index):
        for attempt in range(10):
            p, c, t = self.pair(index)
            try:
                cond = self._load_cond(p, c)
                target = cond if (self.mode == "same" and self.cond_cache is None) else self.pages.image(p, t)
                return cond, target
            except Exception as e:
                new = int(np.random.default_rng([self.seed, index, attempt, 1]).integers(1 << 62))
                key = (self.pages.key(p, c), self.pages.key(p, t))
                if key not in self._bad:
                    self._bad.add(key)
                    log.warning("item %d (%s, %s) failed: %s: %s; replaced by item %d",
                                index, *key, type(e).__name__, e, new)
                index = new
        raise RuntimeError(f"10 consecutive items failed to load; last: {key}")


class StepSampler(torch.utils.data.Sampler):
    """Infinite per-rank batches of dataset indices, deterministic in (seed, rank, world_size).

    Epoch e is a permutation of range(N) seeded by (seed, e); rank r takes positions r, r+W, ... of
    its first (N // W) * W entries (DESIGN: the last N % W items of each epoch's permutation are
    dropped, so all ranks yield equally many and their shards are disjoint), emitted as e * N + i so
    PagePairs draws a fresh pair per epoch. The rank's stream is cut into batches of B (drop_last is
    implicit: the stream never ends). `start` skips the batches already consumed: batch k of a
    sampler with start=s equals batch s + k of one with start=0 (exact resume).
    """

    def __init__(self, n, batch_size, rank, world_size, seed=0, start=0):
        assert 0 <= rank < world_size, f"rank {rank} not in [0, {world_size})"
        assert n >= world_size, f"{n} items cannot be shared by {world_size} ranks"
        self.n, self.batch_size, self.rank, self.world, self.seed, self.start = n, batch_size, rank, world_size, seed, start
        self.per_rank = n // world_size

    def _epoch(self, e):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + e))
        return (perm[: self.per_rank * self.world][self.rank::self.world] + e * self.n).tolist()

    def __iter__(self):
        pos = self.start * self.batch_size              # items of this rank's stream already consumed
        e, off = divmod(pos, self.per_rank)
        buf = self._epoch(e)[off:]
        while True:
            while len(buf) < self.batch_size:
                e += 1
                buf += self._epoch(e)
            yield buf[: self.batch_size]
            buf = buf[self.batch_size:]


def make_loader(dataset, batch_size, rank, world_size, seed, start=0, num_workers=0):
    """Infinite DataLoader of (cond, target) batches for one rank (pass rank/world explicitly: DDP or XLA).

    `start` = batches this rank already consumed (restore it from the checkpoint's step x accumulation).
    """
    sampler = StepSampler(len(dataset), batch_size, rank, world_size, seed, start)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sc = sub.add_parser("scan", help="index a folder / manifest / 'synthetic' and print a JSON summary")
    sc.add_argument("source")
    sc.add_argument("--encoder", help="encoders.py preset name: also count pairs before/after filtering")
    sc.add_argument("--weights", help="local encoder checkpoint")
    sc.add_argument("--decode", action="store_true", help="fully decode every file (catches truncation)")
    sc.add_argument("--cache-dir", default=".cache/semantica", help="embedding cache folder")
    sc.add_argument("--histogram", help="PNG path for the similarity histogram (needs matplotlib)")
    sc.add_argument("--pages", type=int, default=2000, help="number of synthetic pages")
    sy = sub.add_parser("synth", help="write the synthetic pages as PNG folders")
    sy.add_argument("out")
    sy.add_argument("--pages", type=int, default=100)
    sy.add_argument("--size", type=int, default=64)
    sy.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "synth":
        SyntheticPages(args.pages, args.size, args.seed).write(args.out)
        print(json.dumps({"out": args.out, "pages": args.pages, "size": args.size}))
        return
    kw = {"num_pages": args.pages} if args.source == "synthetic" else {}
    pages, skipped = scan(args.source, args.decode, **kw)
    summary = {"pages": len(pages), "images": sum(map(len, pages.values())), "skipped": skipped,
               "singleton_pages": sum(len(v) < 2 for v in pages.values())}
    if args.encoder:
        import encoders
        encoder = encoders.load_encoder(args.encoder, args.weights)
        src = SyntheticPages(image_size=encoder.image_size, **kw) if args.source == "synthetic" \
            else FilePages(pages, encoder.image_size)
        _, report = build_pairs(src, encoder, args.cache_dir, histogram_png=args.histogram)
        print(report.pop("histogram"), file=sys.stderr)
        summary.update(report)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
