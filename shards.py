"""Web-scale pages on disk (Semantica §5): page shards in the WebDataset layout, and the sharded §5 filter pass.

Semantica trains on ~50M filtered pairs of images from one web page (§5, Episodic WebLI). At that scale a
data set is a few thousand tar shards, not millions of files: here ONE WebDataset sample per page, key =
the page id (made tar-safe), members `0.jpg`, `1.png`, ... (the original bytes: JPEG and PNG are copied,
other formats re-encoded to PNG) and `page.json` ({"page": id, "index": n, "images": [source, ...]}).

    python data.py shard pages/ shards/ --per-shard 1000               # a folder of pages, a manifest, "synthetic"
    python data.py shard img2dataset_out/ shards/ --page-key doc_id    # img2dataset shards, regrouped by page
    torchrun --nproc_per_node=8 data.py filter 'shards/{000000..000999}.tar' filtered/ --encoder dinov2-b14 ...

The filter pass (each rank its shards) writes new shards beside the old ones: each page gains `global.npy`
(its images' global embeddings, float16, as the folder path's cache), optionally `tokens.npy` (float16
conditioning tokens at the training size, §3.2), and page.json["filter"] with the kept pairs, chosen by
pairs.select_pairs: the folder path's function, so both paths keep the same pairs. OUT/filter.json holds the
counts and the App. C / Fig. 8 histogram of pair similarities (filter.png with matplotlib).
Streaming training from shards: stream.py. webdataset is an optional extra: pip install -e '.[web]'.
Left out: remote writing (OUT is a local folder), webdataset's own decoders (we decode with images.py's rules).
"""
import io
import json
import logging
import os
import re
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import images
from embeddings import encode_images, encoder_fingerprint
from pairs import histogram_counts, histogram_png, histogram_text, select_pairs

log = logging.getLogger("semantica.shards")

IMAGE_MEMBER = re.compile(r"^(\d+)\.([a-z0-9]+)$")  # "3.jpg": image 3 of the page
KEEP_FORMATS = {b"\xff\xd8\xff": "jpg", b"\x89PNG\r\n\x1a\n": "png"}  # copied byte for byte, never re-encoded


def webdataset():
    """The webdataset module, or ValueError with the install line (an optional extra)."""
    try:
        import webdataset as wds
    except ImportError:
        raise ValueError("page shards need the webdataset package: pip install -e '.[web]'") from None
    return wds


def is_pattern(source):
    """Whether --data names tar shards (a .tar path or brace pattern, or a pipe:/http(s):// URL)."""
    return isinstance(source, str) and (source.endswith(".tar") or source.startswith(("pipe:", "http://", "https://")))


def expand(pattern):
    """Brace pattern -> list of shard URLs, nothing opened or listed ('a/{000..002}.tar' -> 3 URLs)."""
    return list(webdataset().shardlists.expand_urls(pattern))


# ----------------------------------------------------------------------------- writing

def image_member(data):
    """Raw file bytes -> (extension, bytes): JPEG / PNG as they are, any other decodable format as PNG
    (first frame, images.to_rgb). Raises (naming the reason) for bytes that do not decode."""
    for magic, ext in KEEP_FORMATS.items():
        if data.startswith(magic):
            with Image.open(io.BytesIO(data)) as im:
                im.verify()                              # structure check without decoding the pixels
            return ext, data
    with Image.open(io.BytesIO(data)) as im:
        buf = io.BytesIO()
        images.to_rgb(im).save(buf, format="PNG")
    return "png", buf.getvalue()


def tar_key(page_id, used):
    """A tar-safe, shard-unique sample key for a page id (webdataset splits names at the first dot)."""
    key = re.sub(r"[^A-Za-z0-9_-]", "_", str(page_id))[:120] or "page"
    base, n = key, 1
    while key in used:
        key, n = f"{base}_{n}", n + 1
    used.add(key)
    return key


def write_shards(pages, out, per_shard=1000):
    """Write page records [(page_id, [image bytes], [source str])] as OUT/000000.tar, ... (one sample per
    page, `per_shard` pages a shard; each shard written as .tmp then renamed). Undecodable images are
    logged and left out. -> summary dict (pattern, shards, pages, images, skipped {source: reason}).
    ValueError if OUT already holds .tar shards (nothing is overwritten) or no page was written."""
    wds = webdataset()
    if os.path.isdir(out) and any(f.endswith(".tar") for f in os.listdir(out)):
        raise ValueError(f"{out} already holds .tar shards; choose another folder (nothing is overwritten)")
    os.makedirs(out, exist_ok=True)
    writer, path, shard, n_pages, n_images, skipped, used = None, None, -1, 0, 0, {}, set()
    for page_id, blobs, sources in pages:
        members, kept = {}, []
        for blob, source in zip(blobs, sources):
            try:
                ext, data = image_member(blob)
            except Exception as e:
                skipped[source] = f"{type(e).__name__}: {e}"
                log.warning("skipping %s: %s", source, skipped[source])
                continue
            members[f"{len(kept)}.{ext}"] = data
            kept.append(source)
        if not kept:
            continue
        if writer is None or n_pages % per_shard == 0:
            if writer is not None:
                writer.close()
                os.replace(path + ".tmp", path)
            shard += 1
            path, used = os.path.join(out, f"{shard:06d}.tar"), set()
            writer = wds.TarWriter(path + ".tmp", encoder=False, mtime=0)
        meta = {"page": str(page_id), "index": n_pages, "images": kept}
        writer.write({"__key__": tar_key(page_id, used), **members, "page.json": json.dumps(meta).encode()})
        n_pages, n_images = n_pages + 1, n_images + len(kept)
    if writer is None:
        raise ValueError(f"no pages written to {out}: no usable images ({len(skipped)} skipped)")
    writer.close()
    os.replace(path + ".tmp", path)
    pattern = os.path.join(out, f"{{000000..{shard:06d}}}.tar")
    return {"pattern": pattern, "shards": shard + 1, "pages": n_pages, "images": n_images, "skipped": skipped}


def records_from_pages(pages):
    """data.py's pages (FilePages, SyntheticPages) -> write_shards records. A key that is a file is copied
    as its bytes; other images (synthetic) are rendered at pages.image_size and stored as PNG."""
    for p in range(len(pages)):
        blobs, sources = [], []
        for i in range(pages.count(p)):
            key = pages.key(p, i)
            if os.path.isfile(key):
                with open(key, "rb") as f:
                    blobs.append(f.read())
            else:
                a = ((pages.image(p, i).clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
                buf = io.BytesIO()
                Image.fromarray(a).save(buf, format="PNG")
                blobs.append(buf.getvalue())
            sources.append(str(key))
        yield (pages.names[p] if hasattr(pages, "names") else f"page{p:06d}"), blobs, sources


def records_from_img2dataset(folder, page_key):
    """img2dataset output (FOLDER/00000.tar, ...: one image per sample, `.json` with a page/document id
    column `page_key`) -> write_shards records, one per page, images in img2dataset key (input row) order.

    DESIGN: shards are read in name order and a page is written once it was absent from a whole shard, so a
    page straddling consecutive shards is regrouped with memory of about two shards. A page id that comes
    back later (an input list not ordered by page) is written again as another record and counted in the
    `split_pages` warning: sort the URL list by page before running img2dataset."""
    wds = webdataset()
    urls = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".tar"))
    if not urls:
        raise ValueError(f"{folder}: no .tar shards (img2dataset output folder expected)")
    pending, last_seen, done, split = {}, {}, set(), 0

    def flush(ids):
        nonlocal split
        for page in sorted(ids, key=lambda q: min(k for k, _, _ in pending[q])):
            split += page in done
            done.add(page)
            items = sorted(pending.pop(page))
            last_seen.pop(page)
            yield page, [b for _, b, _ in items], [s for _, _, s in items]

    for s, url in enumerate(urls):
        for sample in read_tar(url, wds):
            image = next((sample[e] for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
            try:
                meta = json.loads(sample["json"])
                page = meta[page_key]
            except (KeyError, ValueError) as e:
                log.warning("skipping %s in %s: no page id %r in its .json (%s)", sample["__key__"], url, page_key, e)
                continue
            if image is None or page is None:
                log.warning("skipping %s in %s: %s", sample["__key__"], url, "no image member" if image is None else
                            f"{page_key} is null")
                continue
            source = json.dumps({"url": meta.get("url"), "key": sample["__key__"], "shard": os.path.basename(url),
                                 **({"text": sample["txt"].decode("utf-8", "replace")} if "txt" in sample else {})})
            pending.setdefault(str(page), []).append((sample["__key__"], image, source))
            last_seen[str(page)] = s
        yield from flush([p for p, seen in last_seen.items() if seen < s])
    yield from flush(list(pending))
    if split:
        log.warning("%d page ids came back after their page was written (input not ordered by page): they were "
                    "written as separate records; sort the URL list by page before img2dataset", split)


# ----------------------------------------------------------------------------- reading

def read_tar(url, wds):
    """webdataset samples ({"__key__", extension: bytes}) of one tar; a missing, truncated or corrupt tar
    ends with one logged warning naming the reason (the page being read is lost, earlier pages are kept)."""
    n = 0
    try:
        with wds.gopen(url) as stream:
            files = ({**f, "__url__": url} for f in wds.tariterators.tar_file_iterator(stream))
            for sample in wds.tariterators.group_by_keys(files):
                yield sample
                n += 1
    except Exception as e:
        log.warning("shard %s: unreadable after %d samples, rest skipped (%s: %s)", url, n, type(e).__name__, e)


def read_pages(url):
    """Page records of one page shard: dict(key, url, meta (page.json), names ["0.jpg", ...], images [bytes], arrays
    {"global", "tokens": np.ndarray}). A page without a readable page.json (cut short) is logged and skipped."""
    for sample in read_tar(url, webdataset()):
        try:
            meta = json.loads(sample["page.json"])
        except (KeyError, ValueError) as e:
            log.warning("shard %s: page %s skipped: incomplete, no readable page.json (a truncated shard?) (%s: %s)",
                        url, sample["__key__"], type(e).__name__, e)
            continue
        found = sorted((int(m.group(1)), k) for k in sample if (m := IMAGE_MEMBER.match(k)))
        try:
            arrays = {k[:-4]: np.load(io.BytesIO(v), allow_pickle=False) for k, v in sample.items() if k.endswith(".npy")}
        except ValueError as e:
            log.warning("shard %s: page %s skipped: unreadable .npy member (%s)", url, sample["__key__"], e)
            continue
        yield {"key": sample["__key__"], "url": url, "meta": meta, "names": [k for _, k in found],
               "images": [sample[k] for _, k in found], "arrays": arrays}


def decode(data, size=None, max_pixels=None):
    """Image bytes -> float (3, size, size) in [-1, 1] by images.py's rules (RGB conversion, centre crop in
    source coordinates, decompression-bomb limit images.pixel_limit); raises naming the reason."""
    with images.open_checked(bytes(data), max_pixels) as im:
        im.load()
        return images.centre_crop_resize(images.to_rgb(im), size)


class ShardPages:
    """Page records in memory as data.py's "pages" (len, count, image, key, label, fingerprint), so the
    encoder passes (embeddings.encode_images) and pairs.select_pairs run on a shard unchanged."""

    def __init__(self, records, image_size=None, max_pixels=None):
        self.records, self.image_size, self.max_pixels = records, image_size, max_pixels

    def __len__(self):
        return len(self.records)

    def count(self, page):
        return len(self.records[page]["images"])

    def key(self, page, index):
        return f"{self.records[page]['url']}:{self.records[page]['key']}:{index}"

    def label(self, page):
        return self.records[page]["meta"].get("page", self.records[page]["key"])

    def image(self, page, index, size=None):
        return decode(self.records[page]["images"][index], size or self.image_size, self.max_pixels)

    def fingerprint(self):
        return "|".join(f"{r['url']}:{r['key']}:{len(r['images'])}" for r in self.records)


# ----------------------------------------------------------------------------- the sharded §5 filter pass

def npy(array):
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


@torch.no_grad()
def filter_shards(urls, out, encoder, low, high, rank=0, world=1, image_size=None, seed=0, batch_size=64,
                  max_pixels=None):
    """§5 / App. C filter of page shards, shard s by rank s % world: OUT/<same name>.tar per input shard with
    page.json["filter"] = {encoder, low, high, seed, pairs [[cond, target], ...]} chosen by pairs.select_pairs
    (candidates seeded by page.json's "index", as the folder path's page number), `global.npy` (n, D) float16
    global embeddings at encoder.image_size and, with image_size, `tokens.npy` (n, T, D) float16 conditioning
    tokens at that training size (§3.2). -> this rank's counts and histogram counts (20 and 50 bins)."""
    wds, device = webdataset(), next(encoder.parameters()).device
    total = {"shards": 0, "pages": 0, "pairs_before": 0, "pairs_after": 0, "dropped_low": 0, "dropped_high": 0,
             "unreadable": 0, "hist20": np.zeros(20, np.int64), "hist50": np.zeros(50, np.int64)}
    t0 = time.time()
    for s in range(rank, len(urls), world):
        pages = ShardPages(list(read_pages(urls[s])), encoder.image_size, max_pixels)
        n = sum(pages.count(p) for p in range(len(pages)))
        emb, valid = np.zeros((n, 0), np.float16), np.zeros(n, bool)
        for idx, ok, (g,) in encode_images(pages, lambda x: encoder(encoder.preprocess(x))[:1], encoder.image_size,
                                           batch_size=batch_size, device=device, desc=f"filter {urls[s]}"):
            emb = np.zeros((n, g.shape[1]), np.float16) if emb.shape[1] == 0 else emb
            emb[idx], valid[idx] = g, ok                 # float16, as the folder path's cached_embeddings
        ids = [r["meta"].get("index", p) for p, r in enumerate(pages.records)]
        kept, counts, cos = select_pairs(pages, torch.from_numpy(emb), torch.from_numpy(valid), low, high,
                                         seed=seed, page_ids=ids)
        tokens = None
        if image_size:
            tokens, sized = {}, ShardPages(pages.records, image_size, max_pixels)
            for idx, ok, (tok,) in encode_images(sized, lambda x: encoder(encoder.preprocess(x))[1:], image_size,
                                                 batch_size=batch_size, device=device, desc=f"tokens {urls[s]}"):
                tokens.update({int(g): t for g, t in zip(idx, tok.astype(np.float16))})
        path, offset = os.path.join(out, os.path.basename(urls[s])), 0
        with wds.TarWriter(path + ".tmp", encoder=False, mtime=0) as writer:
            for p, r in enumerate(pages.records):
                c = pages.count(p)
                mine = kept[kept[:, 0] == p][:, 1:].tolist()
                meta = {**r["meta"], "filter": {"encoder": encoder.name, "encoder_fingerprint": encoder_fingerprint(encoder),
                                                "low": low, "high": high, "seed": seed, "pairs": mine,
                                                "valid": valid[offset:offset + c].tolist(), "token_size": image_size}}
                members = dict(zip(r["names"], r["images"]))   # the image bytes, copied as they are
                members["global.npy"] = npy(emb[offset:offset + c])
                if tokens is not None and c:
                    members["tokens.npy"] = npy(np.stack([tokens[g] for g in range(offset, offset + c)]))
                writer.write({"__key__": r["key"], **members, "page.json": json.dumps(meta).encode()})
                offset += c
        os.replace(path + ".tmp", path)
        total["shards"], total["pages"] = total["shards"] + 1, total["pages"] + len(pages)
        for k in ("pairs_before", "pairs_after", "dropped_low", "dropped_high", "unreadable"):
            total[k] += counts[k]
        total["hist20"] += histogram_counts(cos, 20)
        total["hist50"] += histogram_counts(cos, 50)
        print(f"rank {rank}: {urls[s]} -> {path}: {len(pages)} pages, {counts['pairs_after']}/{counts['pairs_before']} "
              f"pairs kept ({time.time() - t0:.0f} s)", file=sys.stderr)
    return total


def filter_shards_torchrun(pattern, out, encoder, low, high, image_size=None, seed=0, batch_size=64, max_pixels=None):
    """filter_shards alone or under torchrun (RANK, WORLD_SIZE; gloo for the barrier; each rank's encoder on
    its own GPU when there are GPUs). Rank 0 then sums every rank's counts into OUT/filter.json with the
    text histogram (App. C, Fig. 8) and OUT/filter.png (matplotlib). -> the report on rank 0, else None.
    ValueError if OUT already holds .tar shards or two input shards share a file name."""
    urls = expand(pattern)
    names = [os.path.basename(u) for u in urls]
    if len(set(names)) != len(names):
        raise ValueError(f"{pattern}: two shards share a file name; the outputs would overwrite each other")
    if os.path.isdir(out) and any(f.endswith(".tar") for f in os.listdir(out)):
        raise ValueError(f"{out} already holds .tar shards; choose another folder (nothing is overwritten)")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("gloo")
        dist.barrier()                                   # every rank checked OUT before any writes
    if torch.cuda.is_available():
        encoder.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    os.makedirs(out, exist_ok=True)
    total = filter_shards(urls, out, encoder, low, high, rank, world, image_size, seed, batch_size, max_pixels)
    part = os.path.join(out, f"filter-rank{rank:05d}.json")
    with open(part + ".tmp", "w") as f:
        json.dump({k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in total.items()}, f)
    os.replace(part + ".tmp", part)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        return None
    parts = []
    for r in range(world):
        with open(os.path.join(out, f"filter-rank{r:05d}.json")) as f:
            parts.append(json.load(f))
    report = {"pattern": os.path.join(out, os.path.basename(pattern)), "encoder": encoder.name, "low": low,
              "high": high, **{k: sum(p[k] for p in parts) for k in parts[0] if not k.startswith("hist")}}
    hist20, hist50 = (np.sum([p[k] for p in parts], axis=0) for k in ("hist20", "hist50"))
    report["histogram"] = histogram_text(None, low, high, counts=hist20)
    png = histogram_png(os.path.join(out, "filter.png"), hist50, low, high, encoder.name)
    if png:
        report["histogram_png"] = png
    with open(os.path.join(out, "filter.json.tmp"), "w") as f:
        json.dump({**report, "histogram_counts": hist50.tolist()}, f, indent=1)
    os.replace(os.path.join(out, "filter.json.tmp"), os.path.join(out, "filter.json"))
    return report
