"""Tests for data.py and embeddings.py: sources, skipping bad files, pair modes (Eq. 2, Eq. 3), the §5 filter
(App. C), the §3.2 conditioning cache, rank shards, the CLI (images.py: tests/test_images.py). Expected values
come from brute-force enumeration, closed forms or hand-built references, never from the code under test."""
import importlib.util
import io
import json
import logging
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import data
from pages import embeddings
import encoders
from pages import images
from pages import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_encoder(seed=0):
    """encoders' "tiny" preset (random weights), counting forward calls."""
    enc = encoders.load_encoder("tiny", seed=seed)
    enc.calls = 0
    enc.register_forward_hook(lambda module, args, out: setattr(module, "calls", module.calls + 1))
    return enc


def write_pages(root, counts, size=24, seed=0):
    """ROOT/page<p>/<i>.png from SyntheticPages; -> {page name: [paths]}."""
    sp = synthetic.SyntheticPages(len(counts), size, seed=seed)
    pages = {}
    for p, n in enumerate(counts):
        d = os.path.join(root, f"page{p}")
        os.makedirs(d, exist_ok=True)
        for i in range(n):
            path = os.path.join(d, f"{i}.png")
            images.save_png(sp.image(p, i % sp.count(p)), path)
            pages.setdefault(f"page{p}", []).append(path)
    return pages


class HandPages:
    """Hand-built pages: image i of page p is a constant image whose value encodes a unique id."""

    def __init__(self, counts, image_size=4):
        self.counts, self.image_size = list(counts), image_size
        self.ids = np.split(np.arange(sum(counts)), np.cumsum(counts)[:-1])
        self.page_of = {int(g): p for p, ids in enumerate(self.ids) for g in ids}

    def __len__(self):
        return len(self.counts)

    def count(self, p):
        return self.counts[p]

    def key(self, p, i):
        return f"hand:{p}:{i}"

    def label(self, p):
        return p

    def fingerprint(self):
        return f"hand:{self.counts}"

    def image(self, p, i, size=None):
        s = size or self.image_size
        return torch.full((3, s, s), -1 + int(self.ids[p][i]) / 32)


def image_id(x):
    return int(round((float(x.reshape(-1)[0]) + 1) * 32))


class LookupEncoder(torch.nn.Module):
    """Global embedding of a HandPages image = table[its id] (tokens: the same vector twice)."""

    image_size, weights = 4, None

    def __init__(self, table, name="dinov2-b14"):
        super().__init__()
        self.name, self.dim = name, table.shape[1]
        self.register_buffer("table", torch.as_tensor(table, dtype=torch.float32))
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def preprocess(self, batch):
        return batch

    def forward(self, batch):
        g = self.table[[image_id(x) % len(self.table) for x in batch]]  # (the cache probes with zeros)
        return g, g[:, None].expand(-1, 2, -1)


# ----------------------------------------------------------------------------- sources and the folder walk

def test_names_callers_use_stay_importable_from_data():
    """metrics, sample, semantica, experiments and other tests call these as data.*: the same objects."""
    for module, names in ((images, ("find_images", "iter_images", "load_image", "to_rgb", "centre_crop_resize")),
                          (embeddings, ("encode_cache", "CondCache")), (synthetic, ("SyntheticPages",))):
        assert all(getattr(data, n) is getattr(module, n) for n in names)


def test_folder_and_manifest_layouts_agree(tmp_path):
    pages = write_pages(tmp_path / "root", [3, 1, 2])
    rows = [(p, os.path.relpath(f, tmp_path)) for p, fs in pages.items() for f in fs]
    (tmp_path / "m.csv").write_text("page,path\n" + "".join(f"{p},{r}\n" for p, r in rows))
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"page": p, "path": r}) + "\n" for p, r in rows))
    # a spreadsheet export: UTF-8 byte-order mark and CRLF line ends
    crlf = "".join(f"{p},{r}\r\n" for p, r in rows)
    (tmp_path / "bom.csv").write_bytes(("\ufeffpage,path\r\n" + crlf).encode("utf-8"))
    (tmp_path / "bom.jsonl").write_bytes(("\ufeff" + "".join(json.dumps({"page": p, "path": r}) + "\r\n"
                                                           for p, r in rows)).encode("utf-8"))
    for source in ("root", "m.csv", "m.jsonl", "bom.csv", "bom.jsonl"):
        got, skipped = data.scan(str(tmp_path / source))
        assert skipped == {}
        assert {k: [os.path.abspath(x) for x in v] for k, v in got.items()} == pages
    x = data.FilePages(pages, 16).image(0, 0)
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    (tmp_path / "bad.csv").write_text("url,file\na,b\n")
    with pytest.raises(ValueError, match="bad.csv.*page"):
        data.scan(str(tmp_path / "bad.csv"))
    (tmp_path / "bad.jsonl").write_text('{"page": "a", "path": "x.png"}\n\n{"page": "a", "path": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3\b"):       # file and line number
        data.scan(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="nowhere"):
        data.scan(str(tmp_path / "nowhere"))


def test_manifest_page_ids_7_and_7_0_are_one_page_and_a_nan_id_is_a_bad_row(tmp_path, capsys):
    """A pandas export: an int id column with gaps is upcast to float (7.0), a missing id is NaN (json.dumps
    writes NaN): 7 and 7.0 name one page; a row whose id is NaN has no page, as a null one."""
    files = [os.path.relpath(f, tmp_path) for f in write_pages(tmp_path / "root", [3])["page0"]]
    rows = [{"page": 7, "path": files[0]}, {"page": 7.0, "path": files[1]}, {"page": 8.0, "path": files[2]}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pages, _ = data.scan(str(tmp_path / "m.jsonl"))
    assert {k: [os.path.basename(f) for f in v] for k, v in pages.items()} == {"7": ["0.png", "1.png"], "8": ["2.png"]}
    (tmp_path / "nan.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + [{"page": float("nan"),
                                                                                       "path": files[0]}]))
    line = _user_error(["scan", str(tmp_path / "nan.jsonl")], capsys)
    assert "nan.jsonl:4: a row needs `page` (not null, NaN or blank)" in line
    (tmp_path / "gap.csv").write_text(f"page,path\n7,{files[0]}\n,{files[1]}\n")      # pandas' NaN in a CSV
    assert "gap.csv:3: a row needs `page`" in _user_error(["scan", str(tmp_path / "gap.csv")], capsys)


def _png(path, size=(8, 8), value=128):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, (value,) * 3).save(path)


def test_scan_pages_come_from_the_walk(tmp_path):
    write_pages(tmp_path / "root", [2, 2])
    os.symlink(tmp_path / "root" / "page0", tmp_path / "root" / "page9")  # a linked page: already counted
    (tmp_path / "root" / "page1" / "deeper").mkdir()
    _png(tmp_path / "root" / "page1" / "deeper" / "x.png")
    pages, _ = data.scan(str(tmp_path / "root"))
    assert sorted(pages) == ["page0", "page1"] and len(pages["page1"]) == 3


# ----------------------------------------------------------------------------- bad files are skipped

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


def test_a_binary_file_as_manifest_is_one_value_error(tmp_path):
    """An image given as --data is read as a CSV manifest: ValueError naming it, not a UnicodeDecodeError."""
    (tmp_path / "one.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(32))
    with pytest.raises(ValueError, match="one.jpg: not a UTF-8 .csv/.jsonl manifest"):
        data.scan(str(tmp_path / "one.jpg"))


def test_missing_manifest_file_is_skipped(tmp_path):
    write_pages(tmp_path, [2])
    (tmp_path / "m.csv").write_text("page,path\np,page0/0.png\np,page0/1.png\np,gone.png\n")
    pages, skipped = data.scan(str(tmp_path / "m.csv"))
    assert skipped == {str(tmp_path / "gone.png"): "missing file (or not a file)"} and len(pages["p"]) == 2


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


# ----------------------------------------------------------------------------- pair modes (Eq. 2, Eq. 3)

def test_page_pairs_are_different_images_of_one_page():
    """Eq. 3 by brute force: ids read from the returned pixels; every ordered pair of distinct images of a
    page with >= 2 images shows up, nothing across pages, no image paired with itself."""
    pages = HandPages([3, 1, 2, 4])
    ds = data.PagePairs(pages, "page", seed=3)
    want = {(int(a), int(b)) for ids in pages.ids if len(ids) > 1 for a in ids for b in ids if a != b}
    seen = set()
    for k in range(200 * len(ds)):
        cond, target = ds[k]
        seen.add((image_id(cond), image_id(target)))
    assert len(want) == 6 + 2 + 12 and seen == want
    assert ds.dropped_pages == 1 and len(ds) == 3
    cond, target = data.PagePairs(pages, "page", seed=3)[5]                       # deterministic in (seed, k)
    assert (image_id(cond), image_id(target)) == tuple(image_id(x) for x in ds[5])


def test_reconstruction_pairs_condition_on_the_target():
    """Eq. 2: one epoch = every image once, as its own condition (singletons included)."""
    pages = HandPages([3, 1, 2])
    ds = data.PagePairs(pages, "same")
    items = [ds[k] for k in range(len(ds))]
    assert sorted(image_id(c) for c, _ in items) == list(range(6))
    assert all(torch.equal(c, t) for c, t in items)


def test_filtered_pairs_are_served_in_order():
    pages = HandPages([3, 2])
    pairs = torch.tensor([[0, 2, 0], [1, 1, 0]])
    ds = data.PagePairs(pages, "page", pairs=pairs)
    got = [tuple(image_id(x) for x in ds[k]) for k in range(4)]
    assert got == [(2, 0), (4, 3), (2, 0), (4, 3)]
    with pytest.raises(ValueError):
        data.PagePairs(pages, "same", pairs=pairs)


# ----------------------------------------------------------------------------- the §5 filter (App. C)

def test_filter_band_edges_are_inclusive():
    cond = torch.tensor([[1.0, 0.0]] * 5)
    target = torch.tensor([[3.0, 4.0], [4.0, 3.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])  # cos .6 .8 0 1 -1
    keep = lambda a, b, lo, hi: data.filter_pairs(a, b, lo, hi).tolist()  # noqa: E731
    assert keep(cond, target, 0.6, 0.8) == [True, True, False, False, False]
    assert keep(cond.half() * 7, target.half(), 0.6, 0.8) == [True, True, False, False, False]
    assert keep(cond, target, np.nextafter(0.6, 1), np.nextafter(0.8, 0)) == [False] * 5
    assert keep(cond, target, -1.0, 1.0) == [True] * 5


def test_filter_defaults_are_app_c_values():
    assert data.filter_band("dinov2-b14") == data.filter_band("dinov2-l14-reg") == (0.3, 0.9)   # App. C
    assert data.filter_band("tiny") == (0.3, 0.9)                                              # a DINOv2 ViT
    assert data.filter_band("dinov2-custom") == (0.3, 0.9)                                      # from_checkpoint names
    assert data.filter_band("siglip-b16-256")[0] == data.filter_band("siglip-l16-384")[0] == 0.65  # App. C
    assert data.filter_band("clip-b16")[0] == data.FILTER_DEFAULTS["clip"][0] == 0.65            # App. C ("CLIP")
    assert data.filter_band("mae-l16") == (0.3, 0.9)                                             # INTERPRETATION
    for low, high in data.FILTER_DEFAULTS.values():
        assert 0 < low < high < 1
    with pytest.raises(ValueError, match="no default filter band"):
        data.filter_band("resnet-50")


def _angles_table(n, seed=0):
    a = np.random.default_rng(seed).uniform(0, np.pi, n)
    return np.stack([np.cos(a), np.sin(a)], 1), a


@pytest.mark.parametrize("name,band", [("dinov2-b14", (0.3, 0.9)), ("siglip-b16-224", (0.65, 0.9))])
def test_filter_compares_condition_with_target(tmp_path, name, band):
    """Brute force over every ordered pair of a hand-built page set: keep (c, t) iff
    low <= cos(E[c], E[t]) <= high, with the band taken from the encoder. A filter that
    compares the condition with itself (cos 1 > high) keeps nothing and fails."""
    pages = HandPages([3, 2, 4, 1, 5])
    table, angle = _angles_table(15, seed=4)
    want = set()
    for p, ids in enumerate(pages.ids):
        for c in range(len(ids)):
            for t in range(len(ids)):
                cos = np.cos(angle[ids[c]] - angle[ids[t]])          # closed form for unit 2-D vectors
                if c != t and band[0] <= cos <= band[1]:
                    want.add((p, c, t))
    pairs, rep = data.build_pairs(pages, LookupEncoder(table, name), tmp_path)
    assert (rep["low"], rep["high"]) == band
    assert 0 < len(want) < rep["pairs_before"] == 6 + 2 + 12 + 20
    assert {tuple(r) for r in pairs.tolist()} == want
    assert rep["dropped_low"] > 0 and rep["dropped_high"] > 0


def test_histogram_png_or_a_line_saying_why_not(tmp_path, caplog, monkeypatch):
    pages, enc = HandPages([2, 2]), LookupEncoder(_angles_table(4)[0])
    if importlib.util.find_spec("matplotlib") is not None:
        _, rep = data.build_pairs(pages, enc, tmp_path, histogram_png=str(tmp_path / "sim.png"))
        assert rep["histogram_png"] == str(tmp_path / "sim.png") and (tmp_path / "sim.png").stat().st_size > 0
    monkeypatch.setitem(sys.modules, "matplotlib", None)                  # as if not installed
    with caplog.at_level(logging.WARNING):
        _, rep = data.build_pairs(pages, enc, tmp_path, histogram_png=str(tmp_path / "no.png"))
    assert "matplotlib" in caplog.text and "histogram_png" not in rep and not (tmp_path / "no.png").exists()


def test_candidate_pairs_all_ordered_pairs_capped():
    sp = synthetic.SyntheticPages(3, 8, images_per_page=(3, 3))
    pairs = data.candidate_pairs(sp, max_pairs_per_page=4)
    assert len(data.candidate_pairs(sp)) == 3 * 6 and len(pairs) == 3 * 4
    assert (pairs[:, 1] != pairs[:, 2]).all() and torch.equal(pairs, data.candidate_pairs(sp, 4))


def test_build_pairs_counts_and_embedding_cache_invalidation(tmp_path, capsys):
    paths = write_pages(tmp_path / "root", [3, 4, 2])
    enc = tiny_encoder()
    fp = data.FilePages(paths, 16)
    pairs, rep = data.build_pairs(fp, enc, tmp_path / "cache", low=-1.0, high=0.99)
    assert "filter embeddings [tiny]" in capsys.readouterr().err                 # progress
    assert rep["pairs_before"] == 6 + 12 + 2
    assert rep["pairs_before"] == rep["pairs_after"] + rep["dropped_low"] + rep["dropped_high"] + rep["unreadable"]
    assert len(pairs) == rep["pairs_after"] and rep["histogram"].count("\n") == 19
    calls = enc.calls
    pairs2, _ = data.build_pairs(fp, enc, tmp_path / "cache", low=-1.0, high=0.99)
    assert enc.calls == calls and torch.equal(pairs, pairs2)                     # served from the cache
    images.save_png(torch.zeros(3, 30, 30), fp.files[1][0])                        # rewrite one file
    emb, _ = embeddings.cached_embeddings(fp, enc, tmp_path / "cache")
    assert enc.calls > calls and len(os.listdir(tmp_path / "cache")) == 2
    assert emb.dtype == torch.float16 and emb.shape[0] == 9


# ----------------------------------------------------------------------------- §3.2 conditioning cache

def test_conditioning_cache_equals_the_encoder(tmp_path):
    sp = synthetic.SyntheticPages(5, 16, images_per_page=(2, 3))
    enc = tiny_encoder()
    out = embeddings.encode_cache(sp, enc, tmp_path / "one")
    sharded = tmp_path / "two"                                   # two ranks, run one after the other
    for rank in (0, 1):
        embeddings.encode_cache(sp, enc, sharded, rank=rank, world=2)
    items = [(p, i) for p in range(len(sp)) for i in range(sp.count(p))]
    with torch.no_grad():                                        # the on-the-fly pass (Semantica.condition)
        g_ref, tok_ref = enc(enc.preprocess(torch.stack([sp.image(p, i) for p, i in items])))
    for folder in (out, sharded):
        cache = embeddings.CondCache(folder).check(sp, enc)
        for g, (p, i) in enumerate(items):
            tok, glob = cache.get(p, i, "tokens"), cache.get(p, i, "global")
            assert tok.dtype == torch.float32 and tok.shape == tok_ref[g].shape
            assert torch.allclose(tok, tok_ref[g], rtol=2e-3, atol=2e-3)         # float16 storage
            assert torch.allclose(glob, g_ref[g], rtol=1e-5, atol=1e-5)
    for kind, ref in (("tokens", tok_ref), ("global", g_ref)):
        ds = data.PagePairs(sp, "page", cond_cache=out, cond_kind=kind, encoder=enc)
        p, c, t = ds.pair(3)
        cond, target = ds[3]
        assert torch.allclose(cond, ref[items.index((p, c))], rtol=2e-3, atol=2e-3)
        assert torch.equal(target, sp.image(p, t))
    with pytest.raises(ValueError, match="encoder tiny"):        # other weights: refused, naming both
        embeddings.CondCache(out).check(encoder=tiny_encoder(seed=1))
    with pytest.raises(ValueError, match="other images"):
        data.PagePairs(synthetic.SyntheticPages(5, 16, seed=1, images_per_page=(2, 3)), cond_cache=out)
    with pytest.raises(ValueError, match="no complete conditioning cache"):
        embeddings.CondCache(tmp_path)
    cache = embeddings.CondCache(out)
    assert embeddings.CondCache.open(cache, sp, enc) is cache                    # a CondCache object passes


def test_filter_reads_the_cached_global_embeddings(tmp_path):
    pages = HandPages([3, 4])
    table, angle = _angles_table(7, seed=2)
    enc = LookupEncoder(table)
    embeddings.encode_cache(pages, enc, tmp_path / "cache")
    calls = []
    enc.register_forward_hook(lambda *a: calls.append(1))
    pairs, rep = data.build_pairs(pages, None, tmp_path / "emb", low=0.0, high=0.95, cond_cache=tmp_path / "cache")
    assert calls == [] and rep["encoder"] == "dinov2-b14"
    want = {(p, c, t) for p, ids in enumerate(pages.ids) for c in range(len(ids)) for t in range(len(ids))
            if c != t and 0.0 <= np.cos(angle[ids[c]] - angle[ids[t]]) <= 0.95}
    assert {tuple(r) for r in pairs.tolist()} == want


# ----------------------------------------------------------------------------- rank shards and resume

class Indices(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, k):
        return k % self.n


@pytest.mark.parametrize("n", [24, 26])
def test_loader_rank_shards_disjoint_and_complete(n):
    """Same seed on every rank -> the ranks' epochs partition range(n) (minus n % world items)."""
    world, b = 3, 4
    shards = []
    for rank in range(world):
        it = iter(data.make_loader(Indices(n), b, rank, world, seed=5))
        shards.append([int(i) for _ in range(2) for i in next(it)])    # 2 batches = 8 = n // world
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == len(flat) == world * (n // world)
    assert n % world or set(flat) == set(range(n))


def test_loader_resume_is_exact():
    sp = synthetic.SyntheticPages(10, 8, seed=2)
    ds = data.PagePairs(sp, "page")
    full = data.make_loader(ds, 3, rank=1, world_size=2, seed=7)
    ref = [b for _, b in zip(range(6), full)]                               # crosses epoch boundaries
    resumed = data.make_loader(ds, 3, rank=1, world_size=2, seed=7, start=4, num_workers=2)
    got = [b for _, b in zip(range(2), resumed)]
    for (c0, t0), (c1, t1) in zip(ref[4:], got):
        assert c0.shape == (3, 3, 8, 8) and torch.equal(c0, c1) and torch.equal(t0, t1)


# ----------------------------------------------------------------------------- CLI

def test_cli_synth_then_scan(tmp_path, capsys):
    data.main(["synth", str(tmp_path / "out"), "--pages", "3", "--size", "16"])
    capsys.readouterr()
    (tmp_path / "out" / "page000000" / "junk.txt").write_text("hello")
    (tmp_path / "out" / "stray.png").write_bytes(b"")
    data.main(["scan", str(tmp_path / "out")])
    summary = json.loads(capsys.readouterr().out)
    sp = synthetic.SyntheticPages(3, 16)
    assert summary["pages"] == 3 and summary["images"] == sum(sp.count(p) for p in range(3))
    assert summary["skipped"][str(tmp_path / "out" / "stray.png")] == "not inside a page folder"
    assert "cannot identify" in summary["skipped"][str(tmp_path / "out" / "page000000" / "junk.txt")]
    assert summary["singleton_pages"] == 0


def test_cli_scan_with_encoder_reports_pair_counts(tmp_path, capsys):
    data.main(["scan", "synthetic", "--pages", "6", "--encoder", "tiny", "--random-encoder", "--cache-dir", str(tmp_path)])
    out = capsys.readouterr()
    summary = json.loads(out.out)
    assert summary["pairs_before"] == summary["pairs_after"] + summary["dropped_low"] + summary["dropped_high"]
    assert (summary["low"], summary["high"]) == (0.3, 0.9) and "+0.90..+1.00" in out.err


def _user_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        data.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_cli_user_errors_are_one_line(tmp_path, capsys, monkeypatch):
    assert "nowhere" in _user_error(["scan", str(tmp_path / "nowhere")], capsys)
    (tmp_path / "empty").mkdir()
    assert "no images under" in _user_error(["scan", str(tmp_path / "empty")], capsys)
    assert "unknown encoder" in _user_error(["scan", "synthetic", "--pages", "2", "--encoder", "nope", "--random-encoder"], capsys)
    assert "--random-encoder" in _user_error(["encode", "synthetic", str(tmp_path / "c"), "--encoder", "tiny",
                                              "--image-size", "16"], capsys)
    # a scan's §5 counts from an encoder without weights would be a random network's: refused like encode's
    assert "--random-encoder" in _user_error(["scan", "synthetic", "--pages", "2", "--encoder", "dinov2-s14"], capsys)
    assert "--encoder" in _user_error(["scan", "synthetic", "--histogram", str(tmp_path / "h.png")], capsys)
    monkeypatch.setitem(sys.modules, "matplotlib", None)                  # as if not installed
    line = _user_error(["scan", "synthetic", "--encoder", "tiny", "--random-encoder", "--histogram", str(tmp_path / "h.png")], capsys)
    assert "matplotlib" in line and not (tmp_path / "h.png").exists()


def test_cli_encode_writes_a_cache_train_can_check(tmp_path, capsys):
    argv = ["encode", "synthetic", str(tmp_path / "c"), "--encoder", "tiny", "--random-encoder",
            "--image-size", "16", "--pages", "4", "--seed", "3"]
    data.main(argv)
    out = capsys.readouterr()
    assert json.loads(out.out)["images"] == sum(synthetic.SyntheticPages(4, seed=3).count(p) for p in range(4))
    assert "encode [tiny]" in out.err                                            # progress bar
    embeddings.CondCache(tmp_path / "c").check(synthetic.SyntheticPages(4, 16, seed=3), encoders.load_encoder("tiny", seed=3))
    assert "--overwrite" in _user_error(argv, capsys)                            # nothing replaced silently


def test_cli_encode_takes_the_activation_an_openclip_file_does_not_record(tmp_path, capsys):
    """An OpenCLIP `visual.*` state dict (the tiny OpenAI-layout CLIP of tests/data/encoders, re-saved as open_clip
    does) cannot say QuickGELU from GELU: refused in one line naming --encoder-act, encoded once it is given."""
    with warnings.catch_warnings():                               # torch 2.13: "torch.jit.load is deprecated"
        warnings.simplefilter("ignore", DeprecationWarning)
        sd = torch.jit.load(os.path.join(ROOT, "tests", "data", "encoders", "clip_openai.pt")).state_dict()
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    argv = ["encode", "synthetic", str(tmp_path / "c"), "--encoder", "clip-custom", "--encoder-weights",
            str(tmp_path / "open_clip_pytorch_model.bin"), "--image-size", "16", "--pages", "2"]
    assert "act= / --encoder-act: quick_gelu" in _user_error(argv, capsys)
    assert not (tmp_path / "c").exists()
    data.main(argv + ["--encoder-act", "gelu"])
    assert json.loads(capsys.readouterr().out)["encoder"] == "clip-custom"
    x = synthetic.SyntheticPages(2, 16).image(0, 0)[None]                 # the pages `encode synthetic` reads
    cached = embeddings.CondCache(tmp_path / "c").get(0, 0, "global")
    towers = [encoders.from_checkpoint(tmp_path / "open_clip_pytorch_model.bin", act=act) for act in ("gelu", "quick_gelu")]
    with torch.no_grad():   # the towers as stated (tests/test_encoders.py checks both against a hand-built CLIP)
        gelu, quick = (t(t.preprocess(x))[0][0] for t in towers)
    assert torch.allclose(cached, gelu, atol=1e-5) and not torch.allclose(cached, quick, atol=1e-3)


@pytest.mark.slow
def test_torchrun_encode_matches_one_process(tmp_path):
    """Two torchrun (gloo) ranks fill one cache; it equals the one-process cache to float16 tolerance."""
    args = ["data.py", "encode", "synthetic", "--encoder", "tiny", "--random-encoder", "--image-size", "16",
            "--pages", "5", "--batch-size", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for out, launcher in (("one", [sys.executable]), ("two", [sys.executable, "-m", "torch.distributed.run",
                                                              "--standalone", "--nproc_per_node=2"])):
        run = subprocess.run(launcher + args[:3] + [str(tmp_path / out)] + args[3:], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
    one, two = embeddings.CondCache(tmp_path / "one"), embeddings.CondCache(tmp_path / "two")
    assert one.meta == two.meta
    for k in ("tokens", "global", "valid"):
        a, b = (np.asarray(c.arrays()[k], dtype=np.float32) for c in (one, two))
        assert a.shape == b.shape and np.allclose(a, b, rtol=2e-3, atol=2e-3)
    a, b = (c.filter_embeddings()[0].float().numpy() for c in (one, two))     # the §5 filter's second pass
    assert a.shape == b.shape and np.allclose(a, b, rtol=2e-3, atol=2e-3)


def test_pairs_touching_an_undecodable_image_are_never_kept():
    """§5 filter with an image that failed to decode (valid False): no kept pair uses it, whatever the band,
    and they are counted as unreadable. Page of 3 images, identical embeddings (cos 1), band [-1, 1]: of the
    6 ordered pairs, the 4 touching image 1 go; (0, 2) and (2, 0) stay (enumerated by hand)."""
    from pages import pairs

    class Pages:
        def __len__(self):
            return 1

        def count(self, p):
            return 3

    emb, valid = torch.ones(3, 4), torch.tensor([True, False, True])
    kept, counts, cos = pairs.select_pairs(Pages(), emb, valid, -1.0, 1.0)
    assert sorted(map(tuple, kept.tolist())) == [(0, 0, 2), (0, 2, 0)]
    assert counts["unreadable"] == 4 and counts["pairs_after"] == 2 and len(cos) == 2
