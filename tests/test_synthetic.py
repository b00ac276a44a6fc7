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
