"""Page shards (shards.py), streaming (stream.py) and train.py on shards (§5 at web scale).

Expected values come from outside the code under test: the page folders and the fake img2dataset output
this file writes itself (page ids, image bytes), the folder path's data.build_pairs (§5, App. C), and an
uninterrupted stream / training run for exact resume.
"""
import collections
import dataclasses
import io
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import encoders
from pages import embeddings
from pages import images
from pages import pairs
from pages import shard_filter
from pages import shards
from pages import stream
from pages import synthetic
import train

wds = pytest.importorskip("webdataset")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16


def write_folder(root, num_pages=22, singletons=2):
    """ROOT/page<p>/<i>.png from SyntheticPages plus `singletons` one-image pages -> {page name: image count}."""
    pages = synthetic.SyntheticPages(num_pages, 24, seed=3)
    pages.write(root)
    for s in range(singletons):
        os.makedirs(os.path.join(root, f"single{s}"))
        images.save_png(pages.image(s, 0), os.path.join(root, f"single{s}", "0.png"))
    counts = {f"page{p:06d}": pages.count(p) for p in range(num_pages)}
    return {**counts, **{f"single{s}": 1 for s in range(singletons)}}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Page folders and their shards (3 pages a shard) -> (folder, pattern, {page: count})."""
    tmp = tmp_path_factory.mktemp("pages")
    counts = write_folder(str(tmp / "pages"))
    data.main(["shard", str(tmp / "pages"), str(tmp / "shards"), "--per-shard", "3"])
    return str(tmp / "pages"), str(tmp / "shards" / f"{{000000..{(len(counts) - 1) // 3:06d}}}.tar"), counts


# ----------------------------------------------------------------------------- writing

def test_shard_writes_one_sample_per_page_with_the_original_bytes(written):
    folder, pattern, counts = written
    got = {}
    for url in shards.expand(pattern):
        for rec in shards.read_pages(url):
            got[rec["meta"]["page"]] = rec
    assert sorted(got) == sorted(counts)                                 # every page once, none lost
    for page, rec in got.items():
        files = sorted(os.listdir(os.path.join(folder, page)))
        assert rec["names"] == [f"{i}.png" for i in range(len(files))]
        assert rec["images"] == [open(os.path.join(folder, page, f), "rb").read() for f in files]  # not re-encoded
        assert [os.path.basename(s) for s in rec["meta"]["images"]] == files


def test_shard_refuses_an_existing_output_and_names_the_reason(written, tmp_path):
    folder, pattern, _ = written
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "shard", folder, os.path.dirname(pattern)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "already holds .tar shards" in r.stderr and "Traceback" not in r.stderr


def jpeg(seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_img2dataset_output_is_regrouped_by_page_across_shards(tmp_path):
    """img2dataset's layout: 00000.tar with 000000000.jpg / .json {url, key, doc} / .txt; doc "b" straddles
    two shards, doc "c" has a WebP image (re-encoded to PNG), one sample lacks the page column."""
    rows = [("a", 0), ("b", 1), ("b", 2), ("a", 3), ("b", 4), ("c", 5), ("c", 6), (None, 7)]
    src = tmp_path / "img2dataset"
    src.mkdir()
    for s, part in enumerate((rows[:3], rows[3:])):
        with wds.TarWriter(str(src / f"{s:05d}.tar"), encoder=False) as w:
            for doc, i in part:
                key = f"{s:05d}{i:04d}"
                meta = {"url": f"http://x/{i}.jpg", "key": key, **({"doc": doc} if doc else {})}
                image = jpeg(i)
                if i == 6:
                    buf = io.BytesIO()
                    Image.open(io.BytesIO(jpeg(i))).save(buf, "WEBP")
                    image = buf.getvalue()
                w.write({"__key__": key, "jpg": image, "json": json.dumps(meta).encode(), "txt": f"caption {i}".encode()})
    data.main(["shard", str(src), str(tmp_path / "out"), "--page-key", "doc", "--per-shard", "2"])
    got = {rec["meta"]["page"]: rec for url in shards.expand(str(tmp_path / "out" / "{000000..000001}.tar"))
           for rec in shards.read_pages(url)}
    assert sorted(got) == ["a", "b", "c"]
    assert got["a"]["images"] == [jpeg(0), jpeg(3)] and got["b"]["images"] == [jpeg(1), jpeg(2), jpeg(4)]
    assert got["c"]["names"] == ["0.jpg", "1.png"] and got["c"]["images"][0] == jpeg(5)
    assert [s["url"] for s in got["b"]["meta"]["images"]] == [f"http://x/{i}.jpg" for i in (1, 2, 4)]   # objects


# ----------------------------------------------------------------------------- streaming

@pytest.mark.parametrize("mode", ["page", "same"])
def test_one_epoch_over_2_ranks_x_2_workers_sees_every_page_once(written, mode):
    _, pattern, counts = written
    seen = collections.Counter()
    for rank in range(2):
        ds = stream.ShardStream(pattern, SIZE, mode, rank=rank, world=2, epochs=1, shuffle_buffer=4)
        for cond, target, state, pages in stream.StreamLoader(ds, 1, 2).loader:
            seen.update(pages)
    skipped = 0
    for unit in range(4):                # the 4 readers' final counters (a finite epoch ends unevenly)
        for *_, counters in ds.items(unit, 4, [0] * len(stream.STATE)):
            pass
        skipped += counters[3]
    if mode == "page":   # Eq. 3: each page with >= 2 images once; the one-image pages counted as skipped
        assert seen == collections.Counter({p: 1 for p, n in counts.items() if n >= 2})
        assert skipped == sum(n < 2 for n in counts.values()) == 2
    else:                # Eq. 2: every image once
        assert seen == collections.Counter(counts)


def test_page_pairs_are_two_different_images_of_the_page(written):
    _, pattern, _ = written
    ds = stream.ShardStream(pattern, SIZE, "page", epochs=1)
    for cond, target, state, page in ds:
        assert not torch.equal(cond, target)


def batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_uninterrupted_stream_exactly(written, workers):
    _, pattern, _ = written
    make = lambda: stream.ShardStream(pattern, SIZE, "page", seed=5, shuffle_buffer=3)  # noqa: E731
    full = batches(stream.StreamLoader(make(), 3, workers), 14)          # crosses windows and epochs
    first = stream.StreamLoader(make(), 3, workers)
    batches(first, 5)
    position = json.loads(json.dumps(first.position()))                  # as stored: plain ints and lists
    rest = batches(stream.StreamLoader(make(), 3, workers, start=position), 9)
    for (c1, t1), (c2, t2) in zip(full[5:], rest):
        assert torch.equal(c1, c2) and torch.equal(t1, t2)
    with pytest.raises(ValueError, match="another --num-workers"):
        stream.StreamLoader(make(), 3, 3, start=position)


def test_a_pattern_is_only_expanded_nothing_is_opened():
    ds = stream.ShardStream("/nonexistent/{000000..099999}.tar", SIZE)   # 100 000 shards, none exists
    assert len(ds.urls) == 100_000 and ds.urls[7] == "/nonexistent/000007.tar"


def test_truncated_shards_and_a_corrupt_member_are_skipped_with_a_logged_reason(written, tmp_path, caplog):
    _, pattern, _ = written
    urls = shards.expand(pattern)
    good = list(shards.read_pages(urls[0]))
    blob = open(urls[1], "rb").read()
    (tmp_path / "000000.tar").write_bytes(blob[:len(blob) // 2])         # cut somewhere in the middle
    (tmp_path / "000001.tar").write_bytes(blob[:512 + 100])              # cut inside the first member's bytes
    with wds.TarWriter(str(tmp_path / "000002.tar"), encoder=False) as w:
        for rec in good:
            members = dict(zip(rec["names"], rec["images"]))
            if rec is good[0]:
                members["1.png"] = b"\x89PNG\r\n\x1a\n not really"           # a corrupt member
            w.write({"__key__": rec["key"], **members, "page.json": json.dumps(rec["meta"]).encode()})
    ds = stream.ShardStream(str(tmp_path / "{000000..000002}.tar"), SIZE, "same", epochs=1, shuffle_buffer=1)
    with caplog.at_level(logging.WARNING):
        items = list(ds)
    assert "000001.tar: unreadable after 0 samples" in caplog.text and "ReadError" in caplog.text
    assert "000000.tar: page" in caplog.text and "incomplete" in caplog.text
    assert "member 1.png skipped" in caplog.text
    complete = list(shards.read_pages(str(tmp_path / "000000.tar")))    # whole pages before the cut are kept
    assert 0 < len(complete) < 3
    assert collections.Counter(page for *_, page in items) == collections.Counter(
        {r["meta"]["page"]: len(r["images"]) - (r is good[0]) for r in good + complete})
    assert items[-1][2][5] == 1                                          # counted as an unreadable member


# ----------------------------------------------------------------------------- the sharded §5 filter

@pytest.fixture(scope="module")
def filtered(written, tmp_path_factory):
    folder, pattern, counts = written
    out = tmp_path_factory.mktemp("filtered")
    data.main(["filter", pattern, str(out / "f"), "--encoder", "tiny", "--random-encoder", "--image-size", str(32)])
    return str(out / "f" / os.path.basename(pattern)), str(out / "f")


def test_filtered_pairs_equal_the_folder_paths_build_pairs(written, filtered, tmp_path):
    folder, _, _ = written
    pages, _ = data.open_pages(folder, 32)
    expected, report = data.build_pairs(pages, encoders.load_encoder("tiny", seed=0), str(tmp_path), 0.3, 0.9)
    expected = {(pages.names[p], c, t) for p, c, t in expected.tolist()}
    got = {(rec["meta"]["page"], c, t) for url in shards.expand(filtered[0]) for rec in shards.read_pages(url)
           for c, t in rec["meta"]["filter"]["pairs"]}
    assert got == expected and 0 < len(got) < report["pairs_before"]
    summary = json.load(open(os.path.join(filtered[1], "filter.json")))
    assert summary["pairs_after"] == report["pairs_after"] and summary["pairs_before"] == report["pairs_before"]
    assert summary["histogram"] == report["histogram"]                  # App. C / Fig. 8 text histogram


def test_a_filtered_stream_yields_exactly_the_kept_pairs(filtered):
    ds = stream.ShardStream(filtered[0], SIZE, "page", band=(0.3, 0.9), epochs=1)
    got = collections.Counter((rec["meta"]["page"], c, t) for rec, c, t, _, _ in ds.items(0, 1, [0] * len(stream.STATE)))
    kept = collections.Counter((rec["meta"]["page"], c, t) for url in shards.expand(filtered[0])
                               for rec in shards.read_pages(url) for c, t in rec["meta"]["filter"]["pairs"])
    assert got == kept


# ----------------------------------------------------------------------------- train.py on shards

FAST = ["--res", "32", "--batch", "4", "--log-every", "1", "--sample-every", "1000", "--sample-steps", "2",
        "--grid-images", "2", "--grid-n", "1", "--device", "cpu", "--ckpt-every", "2", "--random-encoder"]   # the shards' encoder


def run(out, pattern, *flags):
    return train.main(train.parse_args(FAST + ["--data", pattern, "--out", str(out), *flags]))


@pytest.fixture(scope="module")
def trained(written, tmp_path_factory):
    _, pattern, _ = written
    tmp = tmp_path_factory.mktemp("train")
    full = run(tmp / "full", pattern, "--steps", "4", "--num-workers", "0", "--shuffle-buffer", "5")
    run(tmp / "cut", pattern, "--steps", "2", "--num-workers", "0", "--shuffle-buffer", "5")
    resumed = run(tmp / "cut", pattern, "--steps", "4", "--num-workers", "0", "--shuffle-buffer", "5", "--resume")
    return tmp, pattern, full, resumed


def test_train_on_a_shard_pattern_resumes_exactly(trained):
    _, _, full, resumed = trained
    assert [s for s, _ in full["losses"]] == [1, 2, 3, 4]
    assert resumed["losses"] == full["losses"][2:]                       # steps 3 and 4, bit for bit


def test_resuming_a_stream_with_another_world_size_is_a_one_line_error(trained):
    tmp, pattern, _, _ = trained
    path = tmp / "cut" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["data_position"]["world"] == 1 and len(ckpt["data_position"]["ranks"]) == 1
    ckpt["data_position"]["world"], ckpt["world"] = 2, 2                  # as if written by 2 processes
    torch.save(ckpt, path)
    for extra in ([], ["--reshard"]):
        with pytest.raises(train.UserError, match="cannot resume a streaming run with another world size"):
            run(tmp / "cut", pattern, "--steps", "6", "--num-workers", "0", "--shuffle-buffer", "5", "--resume", *extra)


def test_train_reads_filtered_pairs_and_tokens_from_shards(filtered, tmp_path):
    result = run(tmp_path, filtered[0], "--steps", "2", "--num-workers", "0", "--filter-low", "0.3",
                 "--filter-high", "0.9", "--cond-cache", "shards")
    assert len(result["losses"]) == 2 and all(np.isfinite(v) for _, v in result["losses"])
    with pytest.raises(train.UserError, match="not filtered with"):
        run(tmp_path / "other", filtered[0], "--steps", "1", "--filter-low", "0.5", "--filter-high", "0.9")


# ----------------------------------------------------------------------------- bad input: one line or a counted skip

def data_error(capsys, *argv):
    """data.main(argv) must refuse with one argparse-style line (exit 2) -> that line."""
    with pytest.raises(SystemExit) as e:
        data.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def copy_shards(pattern, folder, names, edit=None):
    """Copies of the shards of `pattern` as folder/<name> for name in `names` (None: skip); `edit(meta, members)`
    rewrites each page -> the folder."""
    os.makedirs(folder, exist_ok=True)
    for url, name in zip(shards.expand(pattern), names):
        if name is None:
            continue
        with wds.TarWriter(os.path.join(folder, name), encoder=False) as w:
            for rec in shards.read_pages(url):
                members = {**dict(zip(rec["names"], rec["images"])), **{k + ".npy": shard_filter.npy(v) for k, v in
                                                                         rec["arrays"].items()}}
                meta = json.loads(json.dumps(rec["meta"]))
                if edit:
                    edit(meta, members)
                w.write({"__key__": rec["key"], **members, "page.json": json.dumps(meta).encode()})
    return folder


FILTER = ["--encoder", "tiny", "--random-encoder"]


@pytest.mark.parametrize("bad", ["missing", "empty", "corrupt"])
def test_filter_refuses_a_pattern_without_a_readable_shard_and_writes_nothing(tmp_path, capsys, bad):
    if bad != "missing":
        (tmp_path / "in").mkdir()
        for s in range(4):
            (tmp_path / "in" / f"{s:06d}.tar").write_bytes(b"" if bad == "empty" else b"not a tar" * 100)
    line = data_error(capsys, "filter", tmp_path / "in" / "{000000..000003}.tar", tmp_path / "out", *FILTER)
    assert "error: no readable page in its 4 shards" in line
    assert not (tmp_path / "out").exists()


def test_filter_counts_missing_empty_and_truncated_shards_and_writes_no_empty_shard(written, tmp_path):
    _, pattern, _ = written
    folder = copy_shards(pattern, str(tmp_path / "in"), ["000000.tar", "000001.tar", None, "000003.tar"])
    (tmp_path / "in" / "000002.tar").write_bytes(b"")                   # 0 bytes
    blob = (tmp_path / "in" / "000003.tar").read_bytes()
    (tmp_path / "in" / "000003.tar").write_bytes(blob[:len(blob) * 2 // 3])   # cut: its first pages are kept
    data.main(["filter", os.path.join(folder, "{000000..000005}.tar"), str(tmp_path / "out"), *FILTER])  # 4, 5 missing
    summary = json.load(open(tmp_path / "out" / "filter.json"))
    assert (summary["shards"], summary["unreadable_shards"], summary["truncated_shards"]) == (3, 3, 1)
    assert sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".tar")) == \
        ["000000.tar", "000001.tar", "000003.tar"]                      # nothing for the unreadable shards
    kept = len(list(shards.read_pages(str(tmp_path / "out" / "000003.tar"))))
    assert 0 < kept == len(list(shards.read_pages(str(tmp_path / "in" / "000003.tar")))) < 3
    assert summary["pages"] == 6 + kept


@pytest.mark.parametrize("pattern", ["pages/page{000000..000003}", "{pages,x.tar}"])
def test_filter_and_train_refuse_a_pattern_of_things_that_are_not_tar_shards(written, tmp_path, capsys, pattern):
    folder, _, _ = written
    full = os.path.join(os.path.dirname(folder), pattern)
    line = data_error(capsys, "filter", full, tmp_path / "out", *FILTER)
    assert "not a shard pattern" in line or "is not a .tar shard" in line
    assert not (tmp_path / "out").exists()
    with pytest.raises(train.UserError, match="not a .tar shard|no such file"):
        run(tmp_path / "t", full, "--steps", "1", "--random-encoder")


@pytest.mark.parametrize("low, high", [(0.9, 0.3), (0.5, 0.5), (float("nan"), 0.9), (-2.0, 0.5), (0.3, 1.5)])
def test_a_band_that_is_not_low_below_high_in_minus_1_1_is_refused_by_both_paths(low, high):
    with pytest.raises(ValueError, match="need -1 <= low < high <= 1"):
        pairs.check_band(low, high)
    pages = synthetic.SyntheticPages(3, 8, seed=0)
    n = sum(pages.count(p) for p in range(len(pages)))
    with pytest.raises(ValueError, match="need -1 <= low < high <= 1"):   # the folder path and the sharded pass
        pairs.select_pairs(pages, torch.randn(n, 4), torch.ones(n, dtype=torch.bool), low, high)
    pairs.check_band(-1, 1)                                             # "no filter" stays allowed


def test_an_inverted_band_is_a_one_line_error_in_data_py_and_train_py(written, tmp_path, capsys):
    _, pattern, _ = written
    for band in (["--filter-low", "0.9", "--filter-high", "0.3"], ["--filter-low", "0.95"]):  # 0.95 > tiny's 0.9
        line = data_error(capsys, "filter", pattern, tmp_path / "out", *FILTER, *band)
        assert "low < high" in line and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--filter-low", "0.9", "--filter-high", "0.3"])
    assert e.value.code == 2 and "--filter-low 0.9 must be below --filter-high 0.3" in capsys.readouterr().err
    with pytest.raises(train.UserError, match="low < high"):
        train.filter_band(train.parse_args(["--res", "256", "--filter-low", "0.95"]))


def singles(tmp_path, n=4):
    """n one-image pages as shards of one page each -> pattern."""
    pages = synthetic.SyntheticPages(n, 24, seed=1)
    for p in range(n):
        os.makedirs(tmp_path / "single" / f"p{p}")
        images.save_png(pages.image(p, 0), str(tmp_path / "single" / f"p{p}" / "0.png"))
    data.main(["shard", str(tmp_path / "single"), str(tmp_path / "s"), "--per-shard", "1"])
    return str(tmp_path / "s" / f"{{000000..{n - 1:06d}}}.tar")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_without_a_usable_page_ends_in_one_line_even_from_a_worker(tmp_path, workers):
    pattern = singles(tmp_path)                          # 4 shards of one one-image page each
    with pytest.raises(stream.NoUsablePage) as e:        # before training: shards.json counts no page pair
        stream.StreamLoader(stream.ShardStream(pattern, SIZE, "page"), 2, workers)
    assert str(e.value) == "no usable page in the 4 shards (4 pages, 4 pages with < 2 images)"
    index = json.load(open(tmp_path / "s" / shards.INDEX))
    for entry in index["shards"].values():
        entry["multi"] = 1                                # counts that promise a pair the pages do not hold
    json.dump(index, open(tmp_path / "s" / shards.INDEX, "w"))
    loader = stream.StreamLoader(stream.ShardStream(pattern, SIZE, "page"), 2, workers)
    with pytest.raises(stream.NoUsablePage) as e:
        next(iter(loader))
    readers = max(1, workers)
    assert str(e.value).startswith(f"reader 0 of {readers} got no usable page from its {4 // readers} shards")
    assert "\n" not in str(e.value) and f"{4 // readers} pages with < 2 images" in str(e.value)


def test_train_with_no_usable_page_is_a_one_line_error(filtered, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        pattern = singles(tmp_path)
    assert "4 of 4 pages have a single image" in caplog.text              # the shard command warns
    with pytest.raises(train.UserError, match="no usable page") as e:
        run(tmp_path / "single_run", pattern, "--steps", "1", "--random-encoder", "--num-workers", "0")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "single_run").exists()         # refused when the stream is planned: no folder, config or log
    nothing = copy_shards(filtered[0], str(tmp_path / "none"), [f"{s:06d}.tar" for s in range(8)],
                          lambda meta, members: meta["filter"].update(pairs=[]))     # a band that kept no pair
    with pytest.raises(train.UserError, match="no usable page.*the band kept no pair"):
        run(tmp_path / "none_run", os.path.join(nothing, "{000000..000007}.tar"), "--steps", "1", "--random-encoder",
            "--filter-low", "0.3", "--filter-high", "0.9")


def test_unreadable_first_shards_are_skipped_up_to_a_bound(written, tmp_path, caplog):
    _, pattern, _ = written
    folder = copy_shards(pattern, str(tmp_path / "odd"), [None, None, "000002.tar", "000003.tar"])
    (tmp_path / "odd" / "000000.tar").write_bytes(b"")
    (tmp_path / "odd" / "000001.tar").write_bytes(b"corrupt" * 200)
    odd = os.path.join(folder, "{000000..000003}.tar")
    with caplog.at_level(logging.WARNING):
        result = run(tmp_path / "run", odd, "--steps", "1", "--random-encoder", "--num-workers", "0")
    assert len(result["losses"]) == 1 and "000000.tar" in caplog.text and "000001.tar" in caplog.text
    bad = tmp_path / "bad"
    bad.mkdir()
    for s in range(shards.PROBE_SHARDS + 1):                           # 17 bad shards before a good one
        (bad / f"{s:06d}.tar").write_bytes(b"")
    (bad / f"{shards.PROBE_SHARDS + 1:06d}.tar").write_bytes((tmp_path / "odd" / "000002.tar").read_bytes())
    late = str(bad / f"{{000000..{shards.PROBE_SHARDS + 1:06d}}}.tar")
    assert shards.first_page(shards.expand(late), None)[0].endswith(f"{shards.PROBE_SHARDS + 1:06d}.tar")
    with pytest.raises(train.UserError, match=f"no readable page in its first {shards.PROBE_SHARDS} shards"):
        run(tmp_path / "late", late, "--steps", "1", "--random-encoder")
    assert not (tmp_path / "late").exists()                              # refused before OUT is made


def test_stream_counts_unreadable_shards(written, tmp_path):
    _, pattern, _ = written
    folder = copy_shards(pattern, str(tmp_path / "odd"), ["000000.tar"])
    ds = stream.ShardStream(os.path.join(folder, "{000000..000002}.tar"), SIZE, "same", epochs=1)  # 1, 2 missing
    *_, counters = list(ds.items(0, 1, [0] * len(stream.STATE)))[-1]
    assert counters[6] == 2 and "2 unreadable or truncated shards" in stream.summary([{"units": [counters]}])


def write_img2dataset(folder, docs):
    """A fake img2dataset output: one shard, sample i = jpeg(i) with .json {url, key, doc_id: docs[i]}."""
    os.makedirs(folder)
    with wds.TarWriter(os.path.join(folder, "00000.tar"), encoder=False) as w:
        for i, doc in enumerate(docs):
            meta = {"url": f"http://x/{i}.jpg", "key": f"{i:09d}", "doc_id": doc}
            w.write({"__key__": f"{i:09d}", "jpg": jpeg(i), "json": json.dumps(meta).encode()})
    return folder


def test_img2dataset_page_key_errors_are_early_and_skips_are_counted(tmp_path, capsys):
    src = write_img2dataset(str(tmp_path / "raw"), ["a", "a", None, "b", "b"])
    line = data_error(capsys, "shard", src, tmp_path / "nk", "--page-key", "nonsense")
    assert line.endswith("error: column 'nonsense' not in the .json (it has url, key, doc_id): --page-key names the "
                         "page / document id column (img2dataset --save_additional_columns)")
    assert not (tmp_path / "nk").exists()
    data.main(["shard", src, str(tmp_path / "ok"), "--page-key", "doc_id"])
    summary = json.loads(capsys.readouterr().out)
    assert (summary["pages"], summary["images"]) == (2, 4)
    assert summary["skipped"] == {"00000.tar/000000002": "doc_id is null"}        # the null page id, counted
    nulls = write_img2dataset(str(tmp_path / "nulls"), [None, None, None])
    line = data_error(capsys, "shard", nulls, tmp_path / "none", "--page-key", "doc_id")
    assert "no pages written" in line and "(3 skipped)" in line and not (tmp_path / "none").exists()


def test_a_failing_shard_write_leaves_nothing_behind(tmp_path):
    def records():
        yield "p0", [jpeg(0), jpeg(1)], ["a.jpg", "b.jpg"]
        yield "p1", [jpeg(2), jpeg(3)], ["c.jpg", "d.jpg"]
        raise ValueError("the source broke")
    with pytest.raises(ValueError, match="the source broke"):
        shards.write_shards(records(), str(tmp_path / "deep" / "out"), per_shard=1)
    assert os.listdir(tmp_path) == []                                   # neither shards nor the folders made


def test_image_errors_name_the_member_without_python_object_reprs(written, tmp_path, caplog):
    with pytest.raises(ValueError) as e:
        shards.decode(b"certainly not an image")
    assert "BytesIO" not in str(e.value) and "cannot identify image file" in str(e.value)
    with caplog.at_level(logging.WARNING):
        summary = shards.write_shards([("p", [b"junk", jpeg(1)], ["bad.jpg", "good.jpg"])], str(tmp_path / "o"))
    assert list(summary["skipped"]) == ["bad.jpg"] and "BytesIO" not in summary["skipped"]["bad.jpg"]
    assert "skipping bad.jpg: UnidentifiedImageError: cannot identify image file" in caplog.text


@pytest.mark.parametrize("argv, flag", [
    (["filter", "P", "O", *FILTER, "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["filter", "P", "O", *FILTER, "--image-size", "0"], "--image-size must be >= 1, got 0"),
    (["shard", "synthetic", "O", "--per-shard", "0"], "--per-shard must be >= 1, got 0"),
    (["shard", "synthetic", "O", "--pages", "0"], "--pages must be >= 1, got 0"),
    (["shard", "synthetic", "O", "--size", "-3"], "--size must be >= 1, got -3"),
    (["encode", "synthetic", "O", *FILTER, "--image-size", "0"], "--image-size must be >= 1, got 0"),
    (["synth", "O", "--seed", "-1"], "--seed must be >= 0, got -1"),
])
def test_numbers_nothing_can_be_computed_with_are_refused_before_any_work(written, tmp_path, capsys, argv, flag):
    argv = [written[1] if a == "P" else str(tmp_path / "out") if a == "O" else a for a in argv]
    assert data_error(capsys, *argv).endswith(f"error: {flag}")
    assert not (tmp_path / "out").exists()


def test_a_refused_stream_resume_announces_and_writes_nothing(trained, capsys):
    tmp, pattern, _, _ = trained
    config = (tmp / "full" / "config.json").read_bytes()
    capsys.readouterr()
    with pytest.raises(train.UserError, match=r"another --num-workers \(checkpoint 1, now 2\)"):
        run(tmp / "full", pattern, "--steps", "6", "--num-workers", "2", "--shuffle-buffer", "5", "--resume")
    assert "resumed" not in capsys.readouterr().out and (tmp / "full" / "config.json").read_bytes() == config
    with pytest.raises(train.UserError, match="8 shards cannot feed 9 readers"):
        run(tmp / "wide", pattern, "--steps", "1", "--num-workers", "9")
    assert not (tmp / "wide" / "config.json").exists()


def token_shards(filtered, folder, edit):
    return os.path.join(copy_shards(filtered[0], folder, [f"{s:06d}.tar" for s in range(8)], edit),
                        "{000000..000007}.tar")


def test_cond_cache_shards_mismatch_names_what_differs(filtered, tmp_path):
    band = ["--filter-low", "0.3", "--filter-high", "0.9", "--cond-cache", "shards", "--steps", "1"]
    with pytest.raises(train.UserError, match=r"another tiny \(other weights: shards random init, seed 0, this run "
                                              r"random init, seed 5\)"):
        run(tmp_path / "a", filtered[0], *band, "--seed", "5")
    def no_tokens(meta, members):
        meta["filter"]["token_size"] = None
        members.pop("tokens.npy")
    with pytest.raises(train.UserError, match="no tokens .filtered without --image-size.: re-run data.py filter "
                                              "--image-size 32"):
        run(tmp_path / "b", token_shards(filtered, str(tmp_path / "nt"), no_tokens), *band)
    with pytest.raises(train.UserError, match="tokens are at 64 px, this run trains at 32 px"):
        run(tmp_path / "c", token_shards(filtered, str(tmp_path / "64"),
                                         lambda meta, members: meta["filter"].update(token_size=64)), *band)
    with pytest.raises(train.UserError, match="--conditioning film conditions on the global feature"):
        run(tmp_path / "d", filtered[0], *band, "--conditioning", "film")
    for out in "abcd":                                    # refused runs leave no folder (no config, log, checkpoint)
        assert not (tmp_path / out).exists()


def test_unfiltered_training_on_filtered_shards_warns_and_scan_reports_shards(written, filtered, tmp_path, capsys):
    run(tmp_path / "run", filtered[0], "--steps", "1", "--filter-low", "-1", "--filter-high", "1")
    assert "warning: the shards carry a §5 filter result for [0.3, 0.9] (tiny)" in capsys.readouterr().out
    _, pattern, counts = written
    data.main(["scan", pattern])
    got = json.loads(capsys.readouterr().out)
    assert (got["shards"], got["pages"], got["images"]) == (8, len(counts), sum(counts.values()))
    assert got["singleton_pages"] == 2 and got["filtered"] == {"not filtered": len(counts)}
    data.main(["scan", filtered[0]])
    assert json.loads(capsys.readouterr().out)["filtered"] == {"[0.3, 0.9] tiny": len(counts)}
    assert "filter.json" in data_error(capsys, "scan", pattern, "--encoder", "tiny")


# ----------------------------------------------------------------------------- shard sets joined with "::"

def test_filter_of_sets_joined_with_colons_prints_a_pattern_of_exactly_its_shards(written, tmp_path, capsys):
    """webdataset's list syntax A::B: the filter pass writes every shard of both sets, and the pattern it prints
    and stores names exactly the shards written (none for the missing input 000005.tar), so scan of it counts
    every page: the 7 copied shards of 3 pages each (the fixture's --per-shard 3)."""
    _, pattern, _ = written
    a = copy_shards(pattern, str(tmp_path / "a"), ["000000.tar", "000001.tar", "000002.tar"])
    b = copy_shards(pattern, str(tmp_path / "b"), [None, None, None, "000003.tar", "000004.tar", None, "000006.tar",
                                                   "000007.tar"])
    data.main(["filter", f"{a}/{{000000..000002}}.tar::{b}/{{000003..000007}}.tar", str(tmp_path / "out"), *FILTER])
    printed = json.loads(capsys.readouterr().out)["pattern"]
    wrote = sorted(str(tmp_path / "out" / f) for f in os.listdir(tmp_path / "out") if f.endswith(".tar"))
    assert sorted(shards.expand(printed)) == wrote and len(wrote) == 7
    assert json.load(open(tmp_path / "out" / "filter.json"))["pattern"] == printed
    data.main(["scan", printed])
    got = json.loads(capsys.readouterr().out)
    assert (got["shards"], got["unreadable_shards"], got["pages"]) == (7, 0, 7 * 3)


def test_a_pattern_of_paths_expands_to_exactly_them():
    paths = ["o/000000.tar", "o/000001.tar", "o/000003.tar", "p/7.tar", "p/8.tar", "p/9.tar", "p/10.tar", "q{x}/a.tar"]
    assert shards.expand(shards.pattern_of(paths)) == paths
    assert shards.pattern_of(paths[:2]) == "o/{000000..000001}.tar"


# ----------------------------------------------------------------------------- balanced global epochs

def unequal_sets(tmp_path):
    """Two shard sets joined with "::": one shard of 15 pages, nine of one page; page p has 2 + p % 2 images
    -> (pattern, {page: images}): 24 page pairs, 60 images."""
    pages = {f"p{p:02d}": 2 + p % 2 for p in range(24)}
    records = [(name, [jpeg(100 * p + i) for i in range(n)], [f"{name}/{i}.jpg" for i in range(n)])
               for p, (name, n) in enumerate(pages.items())]
    shards.write_shards(records[:15], str(tmp_path / "big"), per_shard=15)
    shards.write_shards(records[15:], str(tmp_path / "small"), per_shard=1)
    return f"{tmp_path}/big/000000.tar::{tmp_path}/small/{{000000..000008}}.tar", pages


def draw(pattern, world, workers, batches, **kw):
    """Page ids of the first `batches` batches of size 1 of every rank -> Counter."""
    drawn = collections.Counter()
    for rank in range(world):
        ds = stream.ShardStream(pattern, SIZE, rank=rank, world=world, **kw)
        it = iter(stream.StreamLoader(ds, 1, workers).loader)
        for _ in range(batches):
            drawn.update(next(it)[3])
    return drawn


@pytest.mark.parametrize("mode", ["page", "same"])
@pytest.mark.parametrize("world, workers", [(2, 2), (3, 0), (5, 0)])
def test_global_epochs_draw_every_item_once_whatever_the_shard_sizes(tmp_path, mode, world, workers):
    """Readers = world x workers; over two global epochs (each reader draws ceil(2 N / readers) items) every item
    (page pair or image) is drawn twice, plus at most one item per reader at the boundary (5 readers: 24 and
    60 are not multiples of 5). Readers with unequal shares of the shards would draw some pages 0 or 4 times."""
    pattern, pages = unequal_sets(tmp_path)
    expected = {p: 1 if mode == "page" else n for p, n in pages.items()}
    readers = world * max(1, workers)
    per_reader = -(-2 * sum(expected.values()) // readers)
    drawn = draw(pattern, world, workers, per_reader * max(1, workers), mode=mode, shuffle_buffer=4, seed=3)
    assert sum(drawn.values()) == readers * per_reader
    assert all(drawn[p] >= 2 * n for p, n in expected.items()), drawn
    if 2 * sum(expected.values()) % readers == 0:
        assert drawn == collections.Counter({p: 2 * n for p, n in expected.items()})


def test_a_filtered_stream_over_3_readers_draws_every_kept_pair_once(filtered):
    kept = collections.Counter({rec["meta"]["page"]: len(rec["meta"]["filter"]["pairs"])
                                for url in shards.expand(filtered[0]) for rec in shards.read_pages(url)})
    per_reader = -(-sum(kept.values()) // 3)
    drawn = draw(filtered[0], 3, 0, per_reader, band=(0.3, 0.9))
    assert sum(drawn.values()) == 3 * per_reader and all(drawn[p] >= n for p, n in kept.items())


def test_a_balanced_stream_resumes_exactly_across_boundary_shards(tmp_path):
    pattern, _ = unequal_sets(tmp_path)
    make = lambda: stream.ShardStream(pattern, SIZE, "page", seed=5, rank=1, world=2, shuffle_buffer=3)  # noqa: E731
    full = batches(stream.StreamLoader(make(), 3, 2), 14)             # 21 items a reader: 3.5 epochs
    first = stream.StreamLoader(make(), 3, 2)
    batches(first, 5)
    position = json.loads(json.dumps(first.position()))
    rest = batches(stream.StreamLoader(make(), 3, 2, start=position), 9)
    for (c1, t1), (c2, t2) in zip(full[5:], rest):
        assert torch.equal(c1, c2) and torch.equal(t1, t2)
    other = stream.ShardStream(pattern.split("::")[1], SIZE, "page", seed=5, rank=1, world=2)
    with pytest.raises(ValueError, match="changed since the checkpoint"):
        stream.StreamLoader(other, 3, 2, start=position)


def test_shards_that_cannot_be_counted_are_said_in_one_line(written, caplog):
    _, pattern, counts = written
    remote = "pipe:cat " + pattern                        # read through a pipe: no shards.json is looked for
    with caplog.at_level(logging.WARNING):
        ds = stream.ShardStream(remote, SIZE, "page", epochs=1)
        loader = stream.StreamLoader(ds, 1)
    assert "data stream not balanced (8 of 8 shards are remote (their items are not counted))" in caplog.text
    assert loader.position()["layout"] is None
    assert collections.Counter(page for *_, page in ds) == {p: 1 for p, n in counts.items() if n >= 2}


def test_a_stream_uses_only_pages_filtered_by_the_runs_encoder(filtered):
    other = encoders.load_encoder("tiny", seed=1)                 # same preset, other weights
    ds = stream.ShardStream(filtered[0], SIZE, "page", band=(0.3, 0.9), encoder=other)
    with pytest.raises(stream.NoUsablePage, match="none filtered with this band and encoder"):
        stream.StreamLoader(ds, 2)
    ds = stream.ShardStream(filtered[0], SIZE, "page", band=(0.3, 0.9), encoder=encoders.load_encoder("tiny", seed=0))
    next(iter(stream.StreamLoader(ds, 2)))


def test_train_refuses_shards_filtered_by_another_encoder(written, tmp_path):
    """§5: the filter's encoder is the one that conditions. Shards filtered by the tiny encoder of random seed 5
    give a run with the seed-0 tiny encoder no pair: one line before training, no OUT; seed 5 trains on them."""
    _, pattern, _ = written
    data.main(["filter", pattern, str(tmp_path / "f5"), *FILTER, "--seed", "5"])
    seed5, band = os.path.join(str(tmp_path / "f5"), os.path.basename(pattern)), ["--filter-low", "0.3", "--filter-high", "0.9"]
    with pytest.raises(train.UserError, match="no usable page.*none filtered with this band and encoder") as e:
        run(tmp_path / "other", seed5, "--steps", "1", "--num-workers", "0", *band)
    assert "\n" not in str(e.value) and not (tmp_path / "other").exists()
    assert run(tmp_path / "same", seed5, "--steps", "1", "--num-workers", "0", "--seed", "5", *band)["step"] == 1


# ----------------------------------------------------------------------------- page ids that are not clean

def test_img2dataset_nan_page_ids_are_skipped_and_7_and_7_0_are_one_page(tmp_path, capsys):
    """pandas writes a missing id as NaN (json.dumps: NaN) and upcasts an int column with gaps to float (7.0)."""
    rows = [[(7, 0), (float("nan"), 1), (8, 2)], [(7.0, 3), (float("nan"), 4), (None, 5), (float("inf"), 6), (8.0, 7)]]
    (tmp_path / "raw").mkdir()
    for s, part in enumerate(rows):
        with wds.TarWriter(str(tmp_path / "raw" / f"{s:05d}.tar"), encoder=False) as w:
            for doc, i in part:
                meta = {"url": f"http://x/{i}.jpg", "key": f"{i:09d}", "doc_id": doc}
                w.write({"__key__": f"{i:09d}", "jpg": jpeg(i), "json": json.dumps(meta).encode()})
    data.main(["shard", str(tmp_path / "raw"), str(tmp_path / "out"), "--page-key", "doc_id"])
    summary = json.loads(capsys.readouterr().out)
    got = {rec["meta"]["page"]: rec["images"] for url in shards.expand(summary["pattern"])
           for rec in shards.read_pages(url)}
    assert got == {"7": [jpeg(0), jpeg(3)], "8": [jpeg(2), jpeg(7)]}
    assert summary["skipped"] == {"00000.tar/000000001": "doc_id is NaN", "00001.tar/000000004": "doc_id is NaN",
                                  "00001.tar/000000005": "doc_id is null", "00001.tar/000000006": "doc_id is Infinity"}


# ----------------------------------------------------------------------------- one §5 filter for every path

def test_the_filters_candidate_subsets_do_not_depend_on_a_runs_seed(tmp_path, capsys):
    """A page of 10 images has 90 ordered pairs, more than MAX_PAIRS_PER_PAGE (64): its seeded subset is the
    same in the folder path (train --seed) and the shard pass (filter --seed, also the random encoder's)."""
    sp = synthetic.SyntheticPages(2, 24, seed=4)
    for p, n in enumerate((10, 3)):
        os.makedirs(tmp_path / "pages" / f"page{p}")
        for i in range(n):
            images.save_png(sp.image(p, i % sp.count(p)), str(tmp_path / "pages" / f"page{p}" / f"{i}.png"))
    data.main(["shard", str(tmp_path / "pages"), str(tmp_path / "s")])
    data.main(["filter", str(tmp_path / "s" / "000000.tar"), str(tmp_path / "f"), *FILTER, "--seed", "5",
               "--filter-low", "-1", "--filter-high", "0.999"])
    capsys.readouterr()
    got = {(rec["meta"]["page"], c, t) for rec in shards.read_pages(str(tmp_path / "f" / "000000.tar"))
           for c, t in rec["meta"]["filter"]["pairs"]}
    pages, _ = data.open_pages(str(tmp_path / "pages"), 32)
    kept, report = data.build_pairs(pages, encoders.load_encoder("tiny", seed=5), str(tmp_path / "c"), -1.0, 0.999)
    assert report["pairs_before"] == 64 + 6 and got == {(pages.names[p], c, t) for p, c, t in kept.tolist()}


def cropping_encoder():
    """A random ViT with DINOv2's eval transform at a small size: Resize(32) + CenterCrop(28) (224 / 256)."""
    torch.manual_seed(0)
    config = dataclasses.replace(encoders.ENCODER_PRESETS["tiny"], image_size=28, pos_grid=7, crop_ratio=224 / 256)
    return encoders.VisionEncoder(config, name="dinov2-crop").eval()


def official_embedding(path, encoder):
    """The upstream eval transform by hand on the PIL image (a square source: Resize(32, bicubic) = 32 x 32),
    CenterCrop(28), then the encoder's global embedding (float32)."""
    im = Image.open(path).convert("RGB").resize((32, 32), Image.BICUBIC).crop((2, 2, 30, 30))
    with torch.no_grad():
        return encoder(torch.from_numpy(np.asarray(im, np.float32)).permute(2, 0, 1)[None] / 127.5 - 1)[0][0]


def test_one_filter_embedding_in_the_folder_cache_and_shard_paths(tmp_path):
    """§5 filter embeddings are the encoder's global embedding of the official transform of the source image
    (one resize), in the folder pass, the conditioning cache made at another training size (16 px) and the
    shard pass; so the three keep the pairs a brute force over those embeddings keeps (band [0.55, 0.9]: no
    cosine within 0.02 of an edge)."""
    enc, low, high = cropping_encoder(), 0.55, 0.9
    counts = {"page0": 3, "page1": 4, "page2": 2, "page3": 5}
    sp = synthetic.SyntheticPages(4, 24, seed=0)
    for p, (name, n) in enumerate(counts.items()):
        os.makedirs(tmp_path / "pages" / name)
        for i in range(n):
            images.save_png(sp.image(p, i % sp.count(p)), str(tmp_path / "pages" / name / f"{i}.png"))
    paths = {name: [str(tmp_path / "pages" / name / f"{i}.png") for i in range(n)] for name, n in counts.items()}
    ref = {name: torch.stack([official_embedding(f, enc) for f in files]) for name, files in paths.items()}
    want = set()
    for name, e in ref.items():
        cos = torch.nn.functional.cosine_similarity(e[:, None], e[None], dim=-1)
        want |= {(name, c, t) for c in range(len(e)) for t in range(len(e)) if c != t and low <= cos[c, t] <= high}
    fp = data.FilePages(paths, 16)
    emb, _ = embeddings.filter_embeddings(fp, enc)
    assert emb.dtype == np.float16 and torch.allclose(torch.from_numpy(emb).float(), torch.cat(list(ref.values())),
                                                      atol=2e-3)
    embeddings.encode_cache(fp, enc, str(tmp_path / "cond"))
    data.main(["shard", str(tmp_path / "pages"), str(tmp_path / "s")])
    shard_filter.filter_shards_torchrun(str(tmp_path / "s" / "000000.tar"), str(tmp_path / "f"), enc, low, high)
    folder, _ = data.build_pairs(fp, enc, str(tmp_path / "emb"), low, high)
    cached, _ = data.build_pairs(fp, None, None, low, high, cond_cache=str(tmp_path / "cond"))
    sharded = {(rec["meta"]["page"], c, t) for rec in shards.read_pages(str(tmp_path / "f" / "000000.tar"))
               for c, t in rec["meta"]["filter"]["pairs"]}
    assert 0 < len(want) < sum(n * (n - 1) for n in counts.values())
    for kept in (folder, cached):
        assert {(fp.names[p], c, t) for p, c, t in kept.tolist()} == want
    assert sharded == want
