"""Tests for data.py: sources, robust loading, pair modes, pair filtering (§5, App. C), caches, sharding."""
import importlib.util
import io
import json
import logging
import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data


class StandInEncoder(torch.nn.Module):
    """Follows the encoders.py interface (preprocess, forward -> (global, tokens), family, name)."""

    family, name, image_size, dim = "dinov2", "stand-in", 16, 8

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 16, self.dim)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))
        self.calls = 0

    def preprocess(self, images):
        return F.interpolate(images, size=self.image_size, mode="bilinear", antialias=True)

    def forward(self, images):
        self.calls += 1
        patches = F.unfold(images, 4, stride=4).transpose(1, 2)  # (B, 16, 48) for 16 px
        tokens = self.proj(patches)
        return tokens.mean(1), tokens


def tiny_encoder():
    """encoders.load_encoder("tiny") once encoders.py exists, else the stand-in; counts forward calls."""
    if importlib.util.find_spec("encoders") is not None:
        import encoders
        enc = encoders.load_encoder("tiny")
        enc.calls = 0
        enc.register_forward_hook(lambda module, args, out: setattr(module, "calls", module.calls + 1))
        return enc
    return StandInEncoder()


def write_pages(root, counts, size=24, seed=0):
    """ROOT/page<p>/<i>.png from SyntheticPages; -> {page name: [paths]}."""
    sp = data.SyntheticPages(len(counts), size, seed=seed)
    pages = {}
    for p, n in enumerate(counts):
        d = os.path.join(root, f"page{p}")
        os.makedirs(d, exist_ok=True)
        for i in range(n):
            path = os.path.join(d, f"{i}.png")
            data.save_png(sp.image(p, i % sp.count(p)), path)
            pages.setdefault(f"page{p}", []).append(path)
    return pages


# ----------------------------------------------------------------------------- sources

def test_folder_and_manifest_layouts_agree(tmp_path):
    pages = write_pages(tmp_path / "root", [3, 1, 2])
    rows = [(p, os.path.relpath(f, tmp_path)) for p, fs in pages.items() for f in fs]
    with open(tmp_path / "m.csv", "w") as f:
        f.write("page,path\n" + "".join(f"{p},{r}\n" for p, r in rows))
    with open(tmp_path / "m.jsonl", "w") as f:
        f.write("".join(json.dumps({"page": p, "path": r}) + "\n" for p, r in rows))
    for source in (tmp_path / "root", tmp_path / "m.csv", tmp_path / "m.jsonl"):
        got, skipped = data.scan(str(source))
        assert skipped == {}
        assert {k: [os.path.abspath(x) for x in v] for k, v in got.items()} == pages
    fp = data.FilePages(pages, 16)
    x = fp.image(0, 0)
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    with open(tmp_path / "bad.csv", "w") as f:
        f.write("url,file\na,b\n")
    with pytest.raises(ValueError, match="bad.csv.*page"):
        data.scan(str(tmp_path / "bad.csv"))


# ----------------------------------------------------------------------------- robust loading

def _png_bytes(mode="RGB", size=(20, 20)):
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, "PNG")
    return buf.getvalue()


def _jpeg_bytes(size=(64, 64)):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


BAD_FILES = {
    "empty": (b"", {}, "empty"),
    "non-image": (b"<html>not an image</html>", {}, "cannot identify"),
    "truncated-png": (_png_bytes()[:60], {}, ""),
    "truncated-jpeg": (_jpeg_bytes()[:1500], {"decode": True}, "truncated"),
    "bomb": (_png_bytes(size=(64, 64)), {"max_pixels": 1000}, "decompression bomb"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_file_is_skipped_with_reason(tmp_path, kind, caplog):
    content, kw, reason = BAD_FILES[kind]
    write_pages(tmp_path, [2])
    bad = tmp_path / "page0" / "bad.png"
    bad.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        pages, skipped = data.scan(str(tmp_path), **kw)
    assert list(skipped) == [str(bad)] and reason in skipped[str(bad)].lower()
    assert len(pages["page0"]) == 2 and str(bad) in caplog.text


def test_missing_manifest_file_is_skipped(tmp_path):
    write_pages(tmp_path, [2])
    (tmp_path / "m.csv").write_text("page,path\np,page0/0.png\np,page0/1.png\np,gone.png\n")
    pages, skipped = data.scan(str(tmp_path / "m.csv"))
    assert skipped == {str(tmp_path / "gone.png"): "missing file (or not a file)"} and len(pages["p"]) == 2


def _load(tmp_path, im, fmt="PNG", **save_kw):
    path = str(tmp_path / f"img.{fmt.lower()}")
    im.save(path, fmt, **save_kw)
    assert data.check_image(path) is None
    return data.load_image(path, 8)


def test_decodable_modes_become_rgb(tmp_path):
    for mode in ("L", "P", "CMYK", "RGB"):
        x = _load(tmp_path, Image.new(mode, (12, 10), 100), "JPEG" if mode == "CMYK" else "PNG")
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))                 # fully transparent red
    assert torch.allclose(_load(tmp_path, rgba), torch.ones(3, 8, 8))  # composited on white
    deep = Image.fromarray(np.full((10, 10), 65535, np.uint16))       # 16-bit white
    assert deep.mode.startswith("I")
    assert torch.allclose(_load(tmp_path, deep), torch.ones(3, 8, 8))
    # EXIF orientation 6 (rotate 90 degrees clockwise to display): left half red -> top half red
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20, 0], a[:, 20:, 2] = 255, 255
    exif = Image.Exif()
    exif[0x0112] = 6
    x = _load(tmp_path, Image.fromarray(a), "JPEG", exif=exif, quality=95)
    assert x[0, 0].mean() > 0.8 and x[2, 0].mean() < -0.8 and x[2, -1].mean() > 0.8


def test_iter_images_skips_unreadable_and_defaults_to_first_size(tmp_path, caplog):
    Image.new("RGB", (30, 20), "red").save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"junk")
    Image.new("L", (50, 50), 0).save(tmp_path / "c.png")
    with caplog.at_level(logging.WARNING):
        out = list(data.iter_images([tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"]))
    assert [x.shape for x in out] == [(3, 20, 20)] * 2 and "b.png" in caplog.text


def test_load_time_failure_is_replaced_not_raised(tmp_path, caplog):
    write_pages(tmp_path, [2, 2, 2])
    (tmp_path / "page1" / "1.png").unlink()
    (tmp_path / "page1" / "1.jpg").write_bytes(_jpeg_bytes()[:1500])  # passes the cheap scan, fails to decode
    pages, skipped = data.scan(str(tmp_path))
    assert skipped == {}
    ds = data.PagePairs(data.FilePages(pages, 16), "page")
    with caplog.at_level(logging.WARNING):
        items = [ds[k] for k in range(12)]
    assert all(c.shape == t.shape == (3, 16, 16) for c, t in items)
    assert "1.jpg" in caplog.text and "replaced by item" in caplog.text


# ----------------------------------------------------------------------------- pair modes

def test_page_mode_pairs_distinct_images_of_one_page_and_drops_singletons():
    sp = data.SyntheticPages(30, 16, seed=1, images_per_page=(1, 4))
    ds = data.PagePairs(sp, "page", seed=3)
    singles = sum(sp.count(p) < 2 for p in range(30))
    assert singles > 0 and ds.dropped_pages == singles and len(ds) == 30 - singles
    pairs = [ds.pair(k) for k in range(3 * len(ds))]
    assert all(c != t and sp.count(p) >= 2 for p, c, t in pairs)
    assert pairs == [ds.pair(k) for k in range(3 * len(ds))]                      # deterministic
    assert pairs[: len(ds)] != pairs[len(ds): 2 * len(ds)]                          # new pairs each epoch
    cond, target = ds[0]
    p, c, t = ds.pair(0)
    assert torch.equal(cond, sp.image(p, c)) and torch.equal(target, sp.image(p, t))


def test_same_mode_conditions_on_the_target():
    sp = data.SyntheticPages(5, 16, images_per_page=(1, 3))
    ds = data.PagePairs(sp, "same")
    assert len(ds) == sum(sp.count(p) for p in range(5))
    cond, target = ds[4]
    assert torch.equal(cond, target)


# ----------------------------------------------------------------------------- filtering

def test_filter_band_edges_are_inclusive():
    cond = torch.tensor([[1.0, 0.0]] * 5)
    target = torch.tensor([[3.0, 4.0], [4.0, 3.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])  # cos .6 .8 0 1 -1
    assert filter_list(cond, target, 0.6, 0.8) == [True, True, False, False, False]
    assert filter_list(cond.half() * 7, target.half(), 0.6, 0.8) == [True, True, False, False, False]
    assert filter_list(cond, target, np.nextafter(0.6, 1), np.nextafter(0.8, 0)) == [False] * 5
    assert filter_list(cond, target, -1.0, 1.0) == [True] * 5


def filter_list(a, b, low, high):
    return data.filter_pairs(a, b, low, high).tolist()


def test_candidate_pairs_all_ordered_pairs_capped():
    sp = data.SyntheticPages(3, 8, images_per_page=(3, 3))
    pairs = data.candidate_pairs(sp, max_pairs_per_page=4)
    assert len(data.candidate_pairs(sp)) == 3 * 6 and len(pairs) == 3 * 4
    assert (pairs[:, 1] != pairs[:, 2]).all() and torch.equal(pairs, data.candidate_pairs(sp, 4))


def test_build_pairs_counts_and_embedding_cache_invalidation(tmp_path):
    paths = write_pages(tmp_path / "root", [3, 4, 2])
    enc = tiny_encoder()
    fp = data.FilePages(paths, 16)
    pairs, rep = data.build_pairs(fp, enc, tmp_path / "cache", low=-1.0, high=0.99)
    assert rep["pairs_before"] == 6 + 12 + 2
    assert rep["pairs_before"] == rep["pairs_after"] + rep["dropped_low"] + rep["dropped_high"] + rep["unreadable"]
    assert len(pairs) == rep["pairs_after"] and rep["histogram"].count("\n") == 19
    calls = enc.calls
    pairs2, _ = data.build_pairs(fp, enc, tmp_path / "cache", low=-1.0, high=0.99)
    assert enc.calls == calls and torch.equal(pairs, pairs2)                # served from the cache
    f = fp.files[1][0]
    data.save_png(torch.zeros(3, 30, 30), f)                                # rewrite one file
    emb, _ = data.cached_embeddings(fp, enc, tmp_path / "cache")
    assert enc.calls > calls and len(os.listdir(tmp_path / "cache")) == 2
    assert emb.dtype == torch.float16 and emb.shape[0] == 9


def test_conditioning_cache_memmap(tmp_path):
    sp = data.SyntheticPages(4, 16, images_per_page=(2, 3))
    enc = StandInEncoder()
    fn = lambda x: enc(enc.preprocess(x))[1]                                # tokens (B, T, D)
    path = str(tmp_path / "cond.npy")
    data.cache_conditioning(sp, fn, path, tag="stand-in")
    calls = enc.calls
    data.cache_conditioning(sp, fn, path, tag="stand-in")
    assert enc.calls == calls                                               # reused
    ds = data.PagePairs(sp, "page", cond_cache=path)
    cond, target = ds[2]
    p, c, t = ds.pair(2)
    with torch.no_grad():
        want = fn(sp.image(p, c)[None])[0]
    assert cond.shape == (16, 8) and cond.dtype == torch.float32 and target.shape == (3, 16, 16)
    assert torch.allclose(cond, want, atol=1e-2)


# ----------------------------------------------------------------------------- sharding and resume

@pytest.mark.parametrize("n", [24, 26])
def test_rank_shards_disjoint_and_complete(n):
    world, b = 3, 4
    shards = []
    for rank in range(world):
        it = iter(data.StepSampler(n, b, rank, world, seed=5))
        shards.append([i for _ in range(2) for i in next(it)])             # 2 batches = 8 = n // world
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == len(flat) == world * (n // world)              # disjoint, equal sizes
    assert set(flat) <= set(range(n)) and (n % world or set(flat) == set(range(n)))


def test_loader_resume_is_exact():
    sp = data.SyntheticPages(10, 8, seed=2)
    ds = data.PagePairs(sp, "page")
    full = data.make_loader(ds, 3, rank=1, world_size=2, seed=7)
    ref = [b for _, b in zip(range(6), full)]                               # crosses epoch boundaries
    resumed = data.make_loader(ds, 3, rank=1, world_size=2, seed=7, start=4, num_workers=2)
    got = [b for _, b in zip(range(2), resumed)]
    for (c0, t0), (c1, t1) in zip(ref[4:], got):
        assert c0.shape == (3, 3, 8, 8) and torch.equal(c0, c1) and torch.equal(t0, t1)


# ----------------------------------------------------------------------------- synthetic pages

def test_synthetic_pages_deterministic_fast_and_page_coherent():
    a, b = data.SyntheticPages(40, 32, seed=0), data.SyntheticPages(40, 32, seed=0)
    assert torch.equal(a.image(7, 1), b.image(7, 1)) and a.count(7) == b.count(7)
    assert not torch.equal(a.image(7, 1), data.SyntheticPages(40, 32, seed=1).image(7, 1))
    assert {a.label(p) for p in range(40)} <= set(range(len(data.KINDS)))
    t = time.perf_counter()
    imgs = [[a.image(p, i) for i in range(a.count(p))] for p in range(40)]
    assert (time.perf_counter() - t) / sum(map(len, imgs)) < 0.01          # well under 10 ms / image
    # images of a page share colours: mean-colour distance within pages < across pages
    means = [torch.stack([x.mean((1, 2)) for x in page]) for page in imgs]
    within = np.mean([torch.pdist(m).mean().item() for m in means if len(m) > 1])
    across = torch.pdist(torch.stack([m[0] for m in means])).mean().item()
    assert within < 0.7 * across


def test_cli_synth_then_scan(tmp_path, capsys):
    data.main(["synth", str(tmp_path / "out"), "--pages", "3", "--size", "16"])
    capsys.readouterr()
    (tmp_path / "out" / "page000000" / "junk.txt").write_text("hello")
    (tmp_path / "out" / "stray.png").write_bytes(b"")
    data.main(["scan", str(tmp_path / "out")])
    summary = json.loads(capsys.readouterr().out)
    sp = data.SyntheticPages(3, 16)
    assert summary["pages"] == 3 and summary["images"] == sum(sp.count(p) for p in range(3))
    assert summary["skipped"][str(tmp_path / "out" / "stray.png")] == "not inside a page folder"
    assert "cannot identify" in summary["skipped"][str(tmp_path / "out" / "page000000" / "junk.txt")]
    assert summary["singleton_pages"] == 0


@pytest.mark.skipif(importlib.util.find_spec("encoders") is None, reason="encoders.py not present")
def test_cli_scan_with_encoder_reports_pair_counts(tmp_path, capsys):
    data.main(["scan", "synthetic", "--pages", "6", "--encoder", "tiny", "--cache-dir", str(tmp_path)])
    out = capsys.readouterr()
    summary = json.loads(out.out)
    assert summary["pairs_before"] == summary["pairs_after"] + summary["dropped_low"] + summary["dropped_high"]
    assert (summary["low"], summary["high"]) == data.FILTER_DEFAULTS["dinov2"] and "+0.90..+1.00" in out.err
