"""Page shards (shards.py), streaming (stream.py) and train.py on shards: issue 21.

Expected values come from outside the code under test: the page folders and the fake img2dataset output
this file writes itself (page ids, image bytes), the folder path's data.build_pairs (§5, App. C), and an
uninterrupted stream / training run for exact resume.
"""
import collections
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
import images
import shards
import stream
import synthetic
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
    assert [json.loads(s)["url"] for s in got["b"]["meta"]["images"]] == [f"http://x/{i}.jpg" for i in (1, 2, 4)]


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
        for *_, counters in ds.items(unit, 4, [0] * 6):
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
    got = collections.Counter((rec["meta"]["page"], c, t) for rec, c, t, _, _ in ds.items(0, 1, [0] * 6))
    kept = collections.Counter((rec["meta"]["page"], c, t) for url in shards.expand(filtered[0])
                               for rec in shards.read_pages(url) for c, t in rec["meta"]["filter"]["pairs"])
    assert got == kept


# ----------------------------------------------------------------------------- train.py on shards

FAST = ["--res", "32", "--batch", "4", "--log-every", "1", "--sample-every", "1000", "--sample-steps", "2",
        "--grid-images", "2", "--grid-n", "1", "--device", "cpu", "--ckpt-every", "2"]


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
