"""Synthetic "web pages": a deterministic stand-in for Episodic WebLI for tests, demos and CPU runs.

Not part of the paper. Semantica trains on images grouped by web page (§5, Episodic WebLI); this module
draws such pages procedurally so the whole pipeline (data.py's pairs and filter, train.py, sample.py)
runs without a dataset. A page shares semantics (object kind, palette, texture, background family);
its images vary in pose, scale, position, background and lighting (and object count, when a style allows
several objects), and a fraction are unrelated outliers or
near duplicates: what the §5 similarity filter removes. Every image is a pure function of
(seed, page, index), so DataLoader workers and ranks agree without shared state.

    pages = SyntheticPages(num_pages=100, image_size=32)   # the "pages" interface of data.py
    x = pages.image(3, 1)                                   # float (3, 32, 32) in [-1, 1]
    pages.write("out/")                                     # out/page000003/01.png ...: a folder source

All numbers below are DESIGN choices (no paper source).
"""
import os

import numpy as np
import torch

from pages.images import save_png

KINDS = ("circle", "square", "triangle", "star", "ring", "cross", "crescent", "hexagon")
TEXTURES = ("solid", "stripes", "dots", "two-tone", "shaded")
HUES = ("red", "yellow", "green", "cyan", "blue", "magenta")   # alt_text's colour words, hue bins of 60 degrees
WORDS = (*KINDS, *TEXTURES, *HUES, "dark", "light")            # alt_text's vocabulary


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


def _range(name, value, low, high, kind):
    """(lo, hi) with low <= lo <= hi <= high (`low` exclusive for floats) -> tuple, else ValueError."""
    try:
        lo, hi = value
        ok = all(isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) for x in (lo, hi))
    except (TypeError, ValueError):
        ok = False
    if ok and kind is int:
        ok = float(lo).is_integer() and float(hi).is_integer()
    if ok:
        ok = lo <= hi and (lo >= low if kind is int else lo > low) and (high is None or hi <= high)
    if not ok:
        bounds = f"integers >= {low}" if kind is int else f"numbers in ({low}, {high}]"
        raise ValueError(f"SyntheticPages {name} must be a (lo, hi) pair of {bounds} with lo <= hi, got {value!r}")
    return kind(lo), kind(hi)


def _hsv(h, s, v):
    """HSV in [0,1] -> RGB array in [0,1]."""
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


class SyntheticPages:
    """Deterministic procedural "web pages" (DESIGN: a stand-in for Episodic WebLI, §5).

    A page shares semantics across its images: object kind (one of KINDS, `.label(page)`), a colour
    palette, a texture and a background family, which its alt text names (`.alt_text`). Images of a page
    vary in pose (rotation), scale, position, background and lighting (and object count when max_objects allows several). Like real pages, a fraction of images is
    unrelated (`p_outlier`, a random other kind/palette) or a near duplicate of the page's first
    image (`p_duplicate`): what the low/high similarity filter of §5 removes. Every image is made
    from (seed, page, index) alone, so workers and ranks agree without sharing state. All defaults are
    DESIGN choices (no paper source): pages and resolution sized for CPU runs of the tiny preset.

    max_objects: (lo, hi) range of a page's largest object count (each image draws 1..that many);
    object_scale: range of an object's radius as a fraction of half the image side (divided by
    sqrt(count)); shift: how far an object's centre may move from the image centre, as a fraction of the
    room the image leaves it; tilt: the largest rotation in degrees (drawn in [-tilt, tilt]).
    DESIGN (docs/results.md, "The default job"): one object of radius 0.55-0.85 (9-14 px at 32 px), framed like
    a product photo: near the centre (shift 0.15) and nearly upright (tilt 15). With free pose (shift=1,
    tilt=180: anywhere, any rotation) a 2 M-parameter denoiser told the kind outright drew it at chance after
    32 000 training images; framed, it drew it for 0.55 of its samples at 32 000 and 0.80 at 64 000. Older
    styles: free pose (shift=1.0, tilt=180.0); before that also max_objects=(1, 3), object_scale=(0.35, 0.6).
    Bad values (a range that is not two increasing numbers, counts below 1, scales outside (0, 1], shift
    outside [0, 1], tilt outside [0, 180]): ValueError at construction.
    """

    def __init__(self, num_pages=2000, image_size=32, seed=0, images_per_page=(2, 8), p_outlier=0.1,
                 p_duplicate=0.05, max_objects=(1, 1), object_scale=(0.55, 0.85), shift=0.15, tilt=15.0):
        self.num_pages, self.image_size, self.seed = num_pages, image_size, seed
        self.images_per_page, self.p_outlier, self.p_duplicate = images_per_page, p_outlier, p_duplicate
        self.max_objects, self.object_scale = _range("max_objects", max_objects, 1, None, int), \
            _range("object_scale", object_scale, 0, 1, float)
        if not (isinstance(shift, (int, float)) and 0 <= shift <= 1 and isinstance(tilt, (int, float)) and 0 <= tilt <= 180):
            raise ValueError(f"SyntheticPages shift must be in [0, 1] and tilt in [0, 180] degrees, got {shift!r}, {tilt!r}")
        self.shift, self.tilt = float(shift), float(tilt)

    def __len__(self):
        return self.num_pages

    def _page_style(self, page):
        rng = np.random.default_rng([self.seed, page, 0])
        lo, hi = self.images_per_page
        return dict(count=int(rng.integers(lo, hi + 1)), kind=int(rng.integers(len(KINDS))),
                    hue=rng.random(), hue2=rng.random(), texture=int(rng.integers(len(TEXTURES))),
                    bg_hue=rng.random(), bg_dark=bool(rng.random() < 0.3),
                    max_objects=int(rng.integers(self.max_objects[0], self.max_objects[1] + 1)))

    def count(self, page):
        return self._page_style(page)["count"]

    def label(self, page):
        return self._page_style(page)["kind"]

    def _drawn_style(self, page, index):
        """(style actually drawn in image `index` of `page`, rng after its first draw, near-duplicate?): the page's
        style, page image 0's for a near duplicate, another page's for an unrelated outlier."""
        rng = np.random.default_rng([self.seed, page, index + 1])
        roll = rng.random()
        if index > 0 and roll < self.p_duplicate:
            return self._drawn_style(page, 0)[0], rng, True
        if roll > 1 - self.p_outlier:
            return self._page_style(int(rng.integers(1 << 30)) + self.num_pages), rng, False
        return self._page_style(page), rng, False

    def kind(self, page, index):
        """Object kind (index into KINDS) actually drawn in image `index` of `page`: the page's kind,
        except for an unrelated outlier image (another page's style) -- the ground truth of a kind
        classifier (experiments/kinds.py)."""
        return self._drawn_style(page, index)[0]["kind"]

    def alt_text(self, page, index):
        """The words a web page would put in image `index`'s alt text: (kind, texture, colour, background),
        e.g. ("star", "stripes", "red", "light"). DESIGN: what the toy SigLIP encoder (pages/toy_encoder.py)
        learns from, as SigLIP learns from WebLI's image-text pairs; the colour is the object's hue in 6 bins."""
        st = self._drawn_style(page, index)[0]
        return KINDS[st["kind"]], TEXTURES[st["texture"]], HUES[int(st["hue"] * len(HUES)) % len(HUES)], \
            "dark" if st["bg_dark"] else "light"

    def key(self, page, index):
        return f"synthetic:{page}:{index}"

    def style(self):
        """The drawing style as a JSON-ready dict (what caches of trained networks and runs are keyed by)."""
        return dict(max_objects=list(self.max_objects), object_scale=list(self.object_scale), shift=self.shift,
                    tilt=self.tilt)

    def fingerprint(self):
        return (f"synthetic-v2:{self.seed}:{self.num_pages}:{self.images_per_page}:{self.p_outlier}:{self.p_duplicate}"
                f":{self.max_objects}:{self.object_scale}:{self.shift}:{self.tilt}")

    def image(self, page, index, size=None):
        """(3, size, size) float in [-1, 1] for image `index` of `page`."""
        style, rng, duplicate = self._drawn_style(page, index)
        if duplicate:                                    # near duplicate: page image 0, slightly relit
            return (self.image(page, 0, size) * (0.95 + 0.1 * rng.random())).clamp(-1, 1)
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
            scale = rng.uniform(*self.object_scale) / np.sqrt(n)
            cx, cy = rng.uniform(-0.9 + scale, 0.9 - scale, size=2) * self.shift
            th = np.deg2rad(rng.uniform(-self.tilt, self.tilt))
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
        """Write OUT/page<p>/<i>.png (a folder source that data.scan reads back)."""
        for p in range(len(self)):
            d = os.path.join(out, f"page{p:06d}")
            os.makedirs(d, exist_ok=True)
            for i in range(self.count(p)):
                save_png(self.image(p, i, size), os.path.join(d, f"{i:02d}.png"))
