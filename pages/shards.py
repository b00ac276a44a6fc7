"""Web-scale pages on disk (Semantica §5): page shards in the WebDataset layout, written and read.

Semantica trains on ~50M filtered pairs of images from one web page (§5, Episodic WebLI). At that scale a
data set is a few thousand tar shards, not millions of files: here ONE WebDataset sample per page, key =
the page id (made tar-safe), members `0.jpg`, `1.png`, ... (the original bytes: JPEG and PNG are copied,
other formats re-encoded to PNG) and `page.json` ({"page": id, "index": n, "images": [source, ...]}; a source
is a path, or img2dataset's {"url", "key", "shard"[, "text"]} object).

    python data.py shard pages/ shards/ --per-shard 1000               # a folder of pages, a manifest, "synthetic"
    python data.py shard img2dataset_out/ shards/ --page-key doc_id    # img2dataset shards, regrouped by page
    torchrun --nproc_per_node=8 data.py filter 'shards/{000000..000999}.tar' filtered/ --encoder dinov2-b14 ...

OUT/shards.json holds each shard's page counts (write_index), so that stream.py can split every epoch evenly
over its readers without opening a shard; pattern_of writes a pattern naming exactly a list of shards.
Reading is forgiving: a missing, empty, truncated or corrupt shard is logged with its reason and the pages
before the cut are kept (read_tar); first_page probes a pattern for its first readable page.
The §5 filter pass over shards: shard_filter.py. Streaming training from shards: stream.py. webdataset is an optional extra: pip install -e '.[web]'.
Left out: remote writing (OUT is a local folder), webdataset's own decoders (we decode with images.py's rules).
"""
import io
import json
import logging
import math
import os
import re
import shutil

import numpy as np
from PIL import Image

from pages import images

log = logging.getLogger("semantica.shards")

IMAGE_MEMBER = re.compile(r"^(\d+)\.([a-z0-9]+)$")  # "3.jpg": image 3 of the page
KEEP_FORMATS = {b"\xff\xd8\xff": "jpg", b"\x89PNG\r\n\x1a\n": "png"}  # copied byte for byte, never re-encoded
PROBE_SHARDS = 16  # DESIGN: shards train.py tries for a first readable page before it refuses a pattern
REMOTE = ("pipe:", "http://", "https://")  # shard URLs read through webdataset's gopen, not local files
INDEX, INDEX_FORMAT = "shards.json", "semantica-shards/1"  # page counts of the shards of a folder (write_index)


def webdataset():
    """The webdataset module, or ValueError with the install line (an optional extra)."""
    try:
        import webdataset as wds
    except ImportError:
        raise ValueError("page shards need the webdataset package: pip install -e '.[web]'") from None
    return wds


def is_pattern(source):
    """Whether --data names tar shards (a .tar path or brace pattern, or a pipe:/http(s):// URL)."""
    return isinstance(source, str) and (source.endswith(".tar") or source.startswith(REMOTE))


def expand(pattern):
    """Brace pattern -> list of shard URLs, nothing opened or listed ('a/{000..002}.tar' -> 3 URLs).
    ValueError for a pattern that is not one of shards (is_pattern) or a member that is not a .tar (local
    paths; pipe: and http(s):// URLs are taken as they are)."""
    if not is_pattern(pattern):
        raise ValueError(f"{pattern}: not a shard pattern (e.g. 'shards/{{000000..000099}}.tar')")
    urls = list(webdataset().shardlists.expand_urls(pattern))
    bad = [u for u in urls if not u.endswith(".tar") and not u.startswith(REMOTE)]
    if bad:
        raise ValueError(f"{pattern}: {bad[0]} is not a .tar shard (page shards are DIR/NNNNNN.tar files)")
    return urls


def describe(e):
    """An exception as one readable line "Type: text", without Pillow's "<_io.BytesIO object at 0x...>" (the
    caller names the shard and member)."""
    return f"{type(e).__name__}: {re.sub(r' ?<_io.BytesIO object at 0x[0-9a-fA-F]+>', '', str(e))}"


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


def page_id(value):
    """A page / document id -> the str pages are grouped by, or None for no id: null, non-finite floats
    (NaN, pandas' missing value, which json.dumps writes as NaN) and blank strings (a CSV's missing value)
    have none; an integral float is its int (7.0 -> "7": pandas upcasts an int column with gaps to float), so
    7 and 7.0 are one page."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        value = int(value) if value.is_integer() else value
    return None if value is None or not str(value).strip() else str(value)


def source_name(source):
    """A record's image source (a path str, or img2dataset's {url, key, shard} object) as a short name."""
    return source if isinstance(source, str) else f"{source.get('shard')}/{source.get('key')} ({source.get('url')})"


def new_folder(path):
    """os.makedirs(path) -> the topmost folder it created (to remove again), or None if path existed."""
    top, parent = None, os.path.abspath(path)
    while not os.path.exists(parent):
        top, parent = parent, os.path.dirname(parent)
    os.makedirs(path, exist_ok=True)
    return top


def write_shards(pages, out, per_shard=1000, skipped=None):
    """Write page records [(page_id, [image bytes], [source: path str or JSON object])] as OUT/000000.tar, ...
    (one sample per page, `per_shard` pages a shard; each shard written as .tmp then renamed). Undecodable
    images are logged and left out. -> summary dict (pattern, shards, pages, images, single_image_pages,
    skipped {source: reason}); `skipped` may come pre-filled by the record source (records_from_img2dataset).
    Most pages with one image: a logged warning (page pairs need two). OUT/shards.json records each shard's
    page counts (write_index). OUT is created with the first shard; on an error what this call wrote is
    removed (nothing left behind). ValueError if OUT already holds .tar shards (nothing is overwritten) or no
    page was written."""
    wds = webdataset()
    if os.path.isdir(out) and any(f.endswith(".tar") for f in os.listdir(out)):
        raise ValueError(f"{out} already holds .tar shards; choose another folder (nothing is overwritten)")
    skipped = {} if skipped is None else skipped
    writer, path, shard, n_pages, n_images, singles, used, made, done = None, None, -1, 0, 0, 0, set(), None, []
    images_per_page = []                                 # per shard: the image count of each of its pages
    try:
        for page, blobs, sources in pages:
            members, kept = {}, []
            for blob, source in zip(blobs, sources):
                try:
                    ext, data = image_member(blob)
                except Exception as e:
                    skipped[source_name(source)] = describe(e)
                    log.warning("skipping %s: %s", source_name(source), describe(e))
                    continue
                members[f"{len(kept)}.{ext}"] = data
                kept.append(source)
            if not kept:
                continue
            if writer is None or n_pages % per_shard == 0:
                if writer is not None:
                    writer.close()
                    os.replace(path + ".tmp", path)
                    done.append(path)
                made = made or new_folder(out)
                shard += 1
                path, used = os.path.join(out, f"{shard:06d}.tar"), set()
                writer = wds.TarWriter(path + ".tmp", encoder=False, mtime=0)
                images_per_page.append([])
            meta = {"page": str(page), "index": n_pages, "images": kept}
            writer.write({"__key__": tar_key(page, used), **members, "page.json": json.dumps(meta).encode()})
            n_pages, n_images, singles = n_pages + 1, n_images + len(kept), singles + (len(kept) == 1)
            images_per_page[-1].append(len(kept))
        if writer is None:
            raise ValueError(f"no pages written to {out}: no usable images ({len(skipped)} skipped)")
        writer, _ = None, writer.close()
        os.replace(path + ".tmp", path)
        write_index(out, {f"{s:06d}.tar": shard_stats((n, None) for n in counts)
                          for s, counts in enumerate(images_per_page)})
    except BaseException:                                # a refused run leaves nothing behind
        if writer is not None:
            writer.close()
        for f in done + ([path + ".tmp", path] if path else []):
            if os.path.exists(f):
                os.remove(f)
        if made:
            shutil.rmtree(made, ignore_errors=True)
        raise
    if singles * 2 > n_pages:
        log.warning("%d of %d pages have a single image: page pairs (Eq. 3, --pairs page) need two images of one "
                    "page (one page per image? check --page-key)", singles, n_pages)
    pattern = os.path.join(out, f"{{000000..{shard:06d}}}.tar")
    return {"pattern": pattern, "shards": shard + 1, "pages": n_pages, "images": n_images,
            "single_image_pages": singles, "skipped": skipped}


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


def records_from_img2dataset(folder, page_key, skipped=None):
    """img2dataset output (FOLDER/00000.tar, ...: one image per sample, `.json` with a page/document id
    column `page_key`) -> write_shards records, one per page (ids as page_id: 7 and 7.0 are one page), images
    in img2dataset key (input row) order; sources are {url, key, shard[, text]} objects. Samples without an
    image, a page id (null, NaN) or a readable .json are logged and counted in `skipped` ({shard/key:
    reason}). ValueError, before any record, when FOLDER has no .tar or the first sample's .json lacks the
    column (naming the columns it has).

    DESIGN: shards are read in name order and a page is written once it was absent from a whole shard, so a
    page straddling consecutive shards is regrouped with memory of about two shards. A page id that comes
    back later (an input list not ordered by page) is written again as another record and counted in the
    `split_pages` warning: sort the URL list by page before running img2dataset."""
    wds = webdataset()
    urls = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".tar"))
    if not urls:
        raise ValueError(f"{folder}: no .tar shards (img2dataset output folder expected)")
    first = next((sample for url in urls for sample in read_tar(url, wds) if "json" in sample), None)
    try:
        columns = list(json.loads(first["json"])) if first is not None else None
    except ValueError as e:
        raise ValueError(f"{first['__url__']}: sample {first['__key__']} has an unreadable .json ({e})") from None
    if columns is None or page_key not in columns:
        raise ValueError(f"column {page_key!r} not in the .json (it has {', '.join(columns)}): --page-key names the page"
                         f" / document id column (img2dataset --save_additional_columns)" if columns is not None else
                         f"{folder}: no sample with a .json (img2dataset output with --save_additional_columns expected)")
    return regroup(urls, page_key, {} if skipped is None else skipped, wds)


def regroup(urls, page_key, skipped, wds):
    """The records of records_from_img2dataset (a generator)."""
    pending, last_seen, done, split = {}, {}, set(), 0

    def flush(ids):
        nonlocal split
        for page in sorted(ids, key=lambda q: min(k for k, _, _ in pending[q])):
            split += page in done
            done.add(page)
            items = sorted(pending.pop(page), key=lambda item: item[0])
            last_seen.pop(page)
            yield page, [b for _, b, _ in items], [s for _, _, s in items]

    for s, url in enumerate(urls):
        for sample in read_tar(url, wds):
            name, image = f"{os.path.basename(url)}/{sample['__key__']}", next(
                (sample[e] for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
            try:
                meta = json.loads(sample["json"])
                page = page_id(meta[page_key])
                reason = "no image member" if image is None else \
                    f"{page_key} is {json.dumps(meta[page_key])}" if page is None else None
            except (KeyError, ValueError) as e:
                reason = f"no page id {page_key!r} in its .json ({describe(e)})"
            if reason:
                skipped[name] = reason
                log.warning("skipping %s: %s", name, reason)
                continue
            source = {"url": meta.get("url"), "key": sample["__key__"], "shard": os.path.basename(url),
                      **({"text": sample["txt"].decode("utf-8", "replace")} if "txt" in sample else {})}
            pending.setdefault(page, []).append((sample["__key__"], image, source))
            last_seen[page] = s
        yield from flush([p for p, seen in last_seen.items() if seen < s])
    yield from flush(list(pending))
    if split:
        log.warning("%d page ids came back after their page was written (input not ordered by page): they were "
                    "written as separate records; sort the URL list by page before img2dataset", split)


def shard_stats(pages):
    """[(image count, page.json "filter" or None)] of one shard's pages -> its page counts: {"pages",
    "images", "multi" (pages with >= 2 images), "pairs" {band_key: {encoder fingerprint: kept pairs}}}."""
    stats = {"pages": 0, "images": 0, "multi": 0, "pairs": {}}
    for n, f in pages:
        stats["pages"], stats["images"], stats["multi"] = (stats["pages"] + 1, stats["images"] + n,
                                                           stats["multi"] + (n > 1))
        if f:
            kept, who = stats["pairs"].setdefault(band_key((f["low"], f["high"])), {}), f.get("encoder_fingerprint")
            kept[str(who)] = kept.get(str(who), 0) + len(f["pairs"])
    return stats


def band_key(band):
    """A §5 band (low, high) as shard_stats' key: "low high" of the floats."""
    return f"{float(band[0])} {float(band[1])}"


def write_index(out, stats):
    """OUT/shards.json (DESIGN, cf. webdataset's `widsindex` of samples per shard): {"format", "shards": {file
    name: {"bytes": its size, **shard_stats}}} for the shards named in `stats` {file name: shard_stats}, so
    that stream.py can split every epoch evenly over its readers without opening a shard. Written atomically."""
    entries = {name: {"bytes": os.path.getsize(os.path.join(out, name)), **s} for name, s in stats.items()}
    with open(os.path.join(out, INDEX + ".tmp"), "w") as f:
        json.dump({"format": INDEX_FORMAT, "shards": entries}, f)
    os.replace(os.path.join(out, INDEX + ".tmp"), os.path.join(out, INDEX))


def pattern_of(paths):
    """Shard paths -> a pattern naming exactly them, in their order (expand(pattern_of(paths)) == paths): runs
    of consecutive, equally wide numbers as {first..last}, runs joined with webdataset's "::" list syntax."""
    runs = []                                            # [head, first, last, width, tail]; first None: no number
    for p in paths:
        head, digits, tail = re.fullmatch(r"(.*?)(\d*)(\D*)", p, re.S).groups()   # the last number in the path
        n = int(digits) if digits else None
        if runs and n is not None and runs[-1][1] is not None and runs[-1][2] + 1 == n and \
                (runs[-1][0], runs[-1][3], runs[-1][4]) == (head, len(digits), tail):
            runs[-1][2] = n
        else:
            runs.append([head, n, n, len(digits), tail])
    escape = lambda s: re.sub(r"([\\{}])", r"\\\1", s)   # noqa: E731  literal braces for braceexpand
    return "::".join(escape(h) + ("" if a is None else f"{a:0{w}d}" if a == b else f"{{{a:0{w}d}..{b:0{w}d}}}")
                     + escape(t) for h, a, b, w, t in runs)


# ----------------------------------------------------------------------------- reading

def read_tar(url, wds, status=None, quiet=False):
    """webdataset samples ({"__key__", extension: bytes}) of one tar; a missing, truncated or corrupt tar
    ends with one logged warning naming the reason (the page being read is lost, earlier pages are kept).
    `status` (a dict) receives "samples" (how many were read) and "error" (the reason the tar ended early, if
    it did); quiet=True leaves the warning to the caller."""
    status = {} if status is None else status
    status["samples"] = 0
    try:
        with wds.gopen(url) as stream:
            files = ({**f, "__url__": url} for f in wds.tariterators.tar_file_iterator(stream))
            for sample in wds.tariterators.group_by_keys(files):
                yield sample
                status["samples"] += 1
    except Exception as e:
        status["error"] = describe(e)
        if not quiet:
            log.warning("shard %s: unreadable after %d samples, rest skipped (%s)", url, status["samples"], status["error"])


def read_pages(url, status=None, quiet=False):
    """Page records of one page shard: dict(key, url, meta (page.json), names ["0.jpg", ...], images [bytes], arrays
    {"global", "tokens": np.ndarray}). A page without a readable page.json (cut short) is logged and skipped.
    status, quiet: as read_tar's (an incomplete page also sets status["error"])."""
    for sample in read_tar(url, webdataset(), status, quiet):
        try:
            meta = json.loads(sample["page.json"])
        except (KeyError, ValueError) as e:
            log.warning("shard %s: page %s skipped: incomplete, no readable page.json (a truncated shard?) (%s: %s)",
                        url, sample["__key__"], type(e).__name__, e)
            if status is not None:
                status.setdefault("error", f"page {sample['__key__']} incomplete (no readable page.json)")
            continue
        found = sorted((int(m.group(1)), k) for k in sample if (m := IMAGE_MEMBER.match(k)))
        try:
            arrays = {k[:-4]: np.load(io.BytesIO(v), allow_pickle=False) for k, v in sample.items() if k.endswith(".npy")}
        except ValueError as e:
            log.warning("shard %s: page %s skipped: unreadable .npy member (%s)", url, sample["__key__"], e)
            continue
        yield {"key": sample["__key__"], "url": url, "meta": meta, "names": [k for _, k in found],
               "images": [sample[k] for _, k in found], "arrays": arrays}


def read_index(urls):
    """Each url's shards.json entry, or None: a remote url, no readable shards.json in its folder, no entry,
    or a file whose size is not the recorded one (rewritten since)."""
    indexes, entries = {}, []
    for url in urls:
        folder = os.path.dirname(url)
        if folder not in indexes and not url.startswith(REMOTE):
            try:
                with open(os.path.join(folder, INDEX)) as f:
                    index = json.load(f)
                indexes[folder] = index["shards"] if index.get("format") == INDEX_FORMAT else {}
            except (OSError, ValueError, KeyError, AttributeError):
                indexes[folder] = {}
        entry = indexes.get(folder, {}).get(os.path.basename(url))
        try:
            entries.append(entry if entry is not None and os.path.getsize(url) == entry["bytes"] else None)
        except OSError:
            entries.append(None)
    return entries


def first_page(urls, limit=PROBE_SHARDS, quiet=False):
    """(url, page record) of the first readable page in the first `limit` shards (None: all of them), each
    shard skipped before it logged with its reason (quiet=True: not logged). ValueError naming the reasons
    when there is none: a mistyped range, empty or corrupt shards."""
    reasons = []
    for url in urls[:limit]:
        status = {}
        pages = read_pages(url, status, quiet=True)
        record = next(pages, None)
        pages.close()
        if record is not None:
            return url, record
        reasons.append(f"{url}: {status.get('error') or 'no page'}")
        if not quiet:
            log.warning("no readable page in shard %s", reasons[-1])
    tried = f"its first {len(reasons)}" if limit is not None and len(urls) > limit else f"its {len(reasons)}"
    raise ValueError(f"no readable page in {tried} shards (the first: {reasons[0] if reasons else 'none'})")


def scan_shards(urls):
    """Every page of the shards read (no image decoded) -> {shards, unreadable_shards (no page), truncated_shards,
    pages, images, singleton_pages, filtered {"[low, high] encoder": pages}} (data.py scan)."""
    out = {"shards": len(urls), "unreadable_shards": 0, "truncated_shards": 0, "pages": 0, "images": 0,
           "singleton_pages": 0, "filtered": {}}
    for url in urls:
        status, n = {}, out["pages"]
        for rec in read_pages(url, status):
            f = rec["meta"].get("filter")
            band = f"[{f['low']}, {f['high']}] {f['encoder']}" if f else "not filtered"
            out["filtered"][band] = out["filtered"].get(band, 0) + 1
            out["pages"], out["images"] = out["pages"] + 1, out["images"] + len(rec["images"])
            out["singleton_pages"] += len(rec["images"]) < 2
        if out["pages"] == n:
            out["unreadable_shards"] += 1
        elif "error" in status:
            out["truncated_shards"] += 1
    return out


def decode(data, size=None, max_pixels=None):
    """Image bytes -> float (3, size, size) in [-1, 1] by images.py's rules (RGB conversion, centre crop in
    source coordinates, decompression-bomb limit images.pixel_limit); ValueError naming the reason (describe)."""
    try:
        with images.open_checked(bytes(data), max_pixels) as im:
            im.load()
            return images.centre_crop_resize(images.to_rgb(im), size)
    except Exception as e:
        raise ValueError(describe(e)) from None
