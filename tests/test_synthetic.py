"""Tests for synthetic.py, the procedural "web pages" used by tests and demos (not part of the paper).
Speed is measured in bench/, not here."""
import numpy as np
import pytest
import torch

import data
from pages import images
from pages import synthetic


def test_synthetic_pages_deterministic_and_page_coherent():
    a, b = synthetic.SyntheticPages(40, 32, seed=0), synthetic.SyntheticPages(40, 32, seed=0)
    assert torch.equal(a.image(7, 1), b.image(7, 1)) and a.count(7) == b.count(7)
    assert not torch.equal(a.image(7, 1), synthetic.SyntheticPages(40, 32, seed=1).image(7, 1))
    assert {a.label(p) for p in range(40)} <= set(range(len(synthetic.KINDS)))
    imgs = [[a.image(p, i) for i in range(a.count(p))] for p in range(40)]
    assert all(x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1 for page in imgs for x in page)
    # images of a page share colours: mean-colour distance within pages < across pages
    means = [torch.stack([x.mean((1, 2)) for x in page]) for page in imgs]
    within = np.mean([torch.pdist(m).mean().item() for m in means if len(m) > 1])
    across = torch.pdist(torch.stack([m[0] for m in means])).mean().item()
    assert within < 0.7 * across


def test_write_reads_back_through_data(tmp_path):
    sp = synthetic.SyntheticPages(3, 16, seed=2)
    sp.write(str(tmp_path))
    pages, skipped = data.scan(str(tmp_path))
    assert skipped == {} and [len(v) for v in pages.values()] == [sp.count(p) for p in range(3)]
    x = images.load_image(pages["page000001"][0], 16)
    assert (x - sp.image(1, 0)).abs().max() <= 1 / 127.5 + 1e-6           # 8-bit PNG round trip
    assert data.SyntheticPages is synthetic.SyntheticPages                 # re-exported for old callers


def test_kind_is_the_shape_that_is_drawn(monkeypatch):
    """SyntheticPages.kind (the kind classifier's ground truth) names the shape the renderer draws:
    observed by recording _shape_sdf's argument, on pages where most images are outliers (their own
    kind) or near duplicates (image 0's kind)."""
    drawn = []
    real_sdf = synthetic._shape_sdf
    monkeypatch.setattr(synthetic, "_shape_sdf", lambda kind, u, v: drawn.append(kind) or real_sdf(kind, u, v))
    for kw in (dict(p_outlier=0.6, p_duplicate=0.0), dict(p_outlier=0.3, p_duplicate=0.5)):
        pages = synthetic.SyntheticPages(30, 16, seed=5, **kw)
        differs = 0
        for p in range(len(pages)):
            for i in range(pages.count(p)):
                drawn.clear()
                pages.image(p, i)
                assert drawn and set(drawn) == {synthetic.KINDS[pages.kind(p, i)]}, (kw, p, i)
                differs += pages.kind(p, i) != pages.label(p)
        assert differs > 10                              # outliers do carry other kinds
    clean = synthetic.SyntheticPages(30, 16, seed=5, p_outlier=0.0, p_duplicate=0.0)
    assert all(clean.kind(p, i) == clean.label(p) for p in range(30) for i in range(clean.count(p)))


def test_object_count_and_size_follow_the_style(monkeypatch):
    """max_objects is the range of a page's largest object count (each image draws 1..that many);
    object_scale sets each object's radius, divided by sqrt(count): the drawn area of a circle (its
    sdf < 0) is pi r^2, so r is measured from the pixels, one circle at a time."""
    drawn = []
    real_sdf = synthetic._shape_sdf
    monkeypatch.setattr(synthetic, "_shape_sdf", lambda kind, u, v: drawn.append(real_sdf(kind, u, v)) or drawn[-1])
    monkeypatch.setattr(synthetic, "KINDS", ("circle",) * 8)
    size = 64
    for max_objects, scale in (((1, 1), (0.55, 0.85)), ((1, 3), (0.35, 0.6)), ((2, 3), (0.5, 0.5))):
        pages = synthetic.SyntheticPages(16, size, seed=1, p_outlier=0.0, p_duplicate=0.0, max_objects=max_objects,
                                         object_scale=scale)
        page_max = [pages._page_style(p)["max_objects"] for p in range(len(pages))]
        assert set(page_max) == set(range(max_objects[0], max_objects[1] + 1))   # both ends, nothing outside
        below_max = 0
        for p in range(len(pages)):
            for i in range(pages.count(p)):
                drawn.clear()
                pages.image(p, i)
                n = len(drawn)
                assert 1 <= n <= page_max[p]
                below_max += n < page_max[p]
                for sdf in drawn:                        # each circle's radius, in units of half the side
                    r = np.sqrt((sdf < 0).sum() / np.pi) / (size / 2) * np.sqrt(n)
                    assert scale[0] - 0.04 <= r <= scale[1] + 0.04, (max_objects, scale, n, r)
        assert below_max > 0 or max_objects == (1, 1)    # images draw 1..page max, not always the max
    a = synthetic.SyntheticPages(5, 16)
    assert (a.max_objects, a.object_scale) == ((1, 1), (0.55, 0.85))   # the default style (docs/study.md)
    for kw in (dict(max_objects=(1, 3)), dict(object_scale=(0.35, 0.6))):
        assert synthetic.SyntheticPages(5, 16, **kw).fingerprint() != a.fingerprint(), kw   # caches never mix styles


def test_bad_styles_are_one_line_errors():
    for kw in (dict(max_objects=(0, 2)), dict(max_objects=(3, 1)), dict(max_objects=2), dict(max_objects=(1.5, 2)),
               dict(max_objects=(1, 1, 5)), dict(object_scale=(0.9, 0.2)), dict(object_scale=(0, 0)),
               dict(object_scale=(-0.5, -0.3)), dict(object_scale=(0.5,)), dict(object_scale=(0.5, 1.5))):
        with pytest.raises(ValueError, match=f"SyntheticPages {next(iter(kw))} must be"):
            synthetic.SyntheticPages(3, **kw)


def test_framed_pose_stays_near_the_centre_and_nearly_upright(monkeypatch):
    """shift bounds the object's centre to shift x (0.9 - radius) of the centre; tilt bounds the rotation in
    degrees: both read off the renderer's shape coordinates (u, v) at the image centre and one pixel right."""
    seen = []
    real_sdf = synthetic._shape_sdf
    monkeypatch.setattr(synthetic, "_shape_sdf", lambda kind, u, v: seen.append((u.copy(), v.copy())) or real_sdf(kind, u, v))
    size = 32
    for shift, tilt in ((0.0, 0.0), (0.15, 15.0), (1.0, 180.0)):
        pages = synthetic.SyntheticPages(20, size, seed=3, p_outlier=0.0, p_duplicate=0.0, shift=shift, tilt=tilt)
        centres, angles = [], []
        for p in range(len(pages)):
            seen.clear()
            pages.image(p, 0)
            u, v = seen[0]
            x = (np.arange(size) + 0.5) / size * 2 - 1                 # pixel centres (renderer's grid)
            # u, v are affine in (x, y): solve for the centre and angle from three pixels
            du, dv = u[0, 1] - u[0, 0], v[0, 1] - v[0, 0]           # one pixel right: (cos th, -sin th) / scale
            angles.append(np.degrees(np.arctan2(-dv, du)))
            scale = (2 / size) / np.hypot(du, dv)
            c, s_ = np.cos(np.radians(angles[-1])), np.sin(np.radians(angles[-1]))
            cx = x[0] - scale * (c * u[0, 0] - s_ * v[0, 0])
            cy = x[0] - scale * (s_ * u[0, 0] + c * v[0, 0])
            centres.append((abs(cx) / max(0.9 - scale, 1e-9), abs(cy) / max(0.9 - scale, 1e-9)))
        assert np.max(centres) <= shift + 1e-4 and np.max(np.abs(angles)) <= tilt + 1e-3, (shift, tilt)
        if shift:
            assert np.max(centres) > shift / 3 and np.max(np.abs(angles)) > tilt / 3   # the range is used
    assert synthetic.SyntheticPages(2).style()["shift"] == 0.15 and synthetic.SyntheticPages(2).style()["tilt"] == 15.0
    for kw in (dict(shift=1.5), dict(shift=-0.1), dict(tilt=200), dict(tilt="5")):
        with pytest.raises(ValueError, match="shift must be in"):
            synthetic.SyntheticPages(2, **kw)


def test_alt_text_names_what_is_drawn():
    """alt_text's kind is the kind drawn (outliers included), its words come from WORDS, and images of a clean
    page share their alt text (page semantics)."""
    pages = synthetic.SyntheticPages(40, 16, seed=7, p_outlier=0.5, p_duplicate=0.2)
    outliers = 0
    for p in range(len(pages)):
        for i in range(pages.count(p)):
            words = pages.alt_text(p, i)
            assert len(words) == 4 and set(words) <= set(synthetic.WORDS)
            assert words[0] == synthetic.KINDS[pages.kind(p, i)] and words[3] in ("dark", "light")
            outliers += words[0] != synthetic.KINDS[pages.label(p)]
    assert outliers > 5
    clean = synthetic.SyntheticPages(20, 16, seed=7, p_outlier=0.0, p_duplicate=0.0)
    assert all(len({clean.alt_text(p, i) for i in range(clean.count(p))}) == 1 for p in range(20))
    # the colour word is the object's hue bin: a red page is reddest in its object
    assert len({clean.alt_text(p, 0)[2] for p in range(20)}) >= 4
