"""Web-page image pairs (Semantica §5): page sources, pairs and the §5 filter, the training loader.

Semantica (arXiv 2405.14857) trains on pairs from one web page: target x an image of a page, condition
y_c the frozen encoder's representation of another image of that page (Eq. 3, §5); the reconstruction
baseline conditions on the target itself (Eq. 2, §4); class folders as pages give §8.3's label-grouped
data. Pairs are kept when the cosine of the encoder's global embeddings of condition and target is in
[low, high] (§5, App. C). The encoder is frozen, so its outputs can be computed once (§3.2: `encode`).
Sources ("pages": len(), .count(p), .image(p, i, size), .key(p, i), .label(p), .fingerprint()): a folder
ROOT/<page>/.../<image>, a .csv/.jsonl manifest (`page`, `path` relative to it), or "synthetic"
(synthetic.SyntheticPages, a test/demo generator). make_loader yields (cond, target): target
(B, 3, S, S) in [-1, 1]; cond the image (B, 3, S, S), or cached tokens (B, T, D) / global (B, D), float32.

    python data.py scan DIR --encoder dinov2-b14 --encoder-weights W.pth   # pairs before/after the filter
    torchrun --nproc_per_node=8 data.py encode DIR CACHE --encoder dinov2-b14 --encoder-weights W.pth --image-size 256
    python data.py shard SRC shards/ --per-shard 1000 [--page-key doc_id]    # page shards (shards.py, streamed by stream.py)
    python data.py filter 'shards/{000000..000099}.tar' filtered/ --encoder dinov2-b14 ...   # §5 on shards (shard_filter.py)
    python data.py scan 'shards/{000000..000099}.tar'                       # pages / images / filter bands of shards
Order: page sources, §5 filter (the selection itself: pairs.py), PagePairs + loader, CLI (image I/O: images.py;
encoder passes: embeddings.py; page shards: shards.py, stream.py).
Left out: multi-image conditioning, the manual inspection that set the thresholds (App. C).
"""
import argparse
import csv
import hashlib
import importlib.util
import json
import logging
import os
import sys

import numpy as np
import torch

import encoders
# Names not used here are re-exported for callers (data.encode_cache, data.iter_images, data.save_png, ...).
from pages.embeddings import CondCache, cached_embeddings, encode_cache, encode_cache_torchrun  # noqa: F401
from pages.images import centre_crop_resize, check_image, find_images, iter_images, load_image, to_rgb  # noqa: F401
from pages.pairs import FILTER_DEFAULTS, MAX_PAIRS_PER_PAGE, candidate_pairs, cosine, filter_band, filter_pairs  # noqa: F401
from pages.pairs import check_band, histogram_counts, histogram_text, select_pairs
from pages.pairs import histogram_png as pairs_histogram_png
from pages.shard_filter import filter_shards_torchrun
from pages.shards import expand, is_pattern, page_id, records_from_img2dataset, records_from_pages, scan_shards
from pages.shards import write_shards
from pages.stream import ShardStream, StreamLoader
from pages.synthetic import SyntheticPages  # noqa: F401

log = logging.getLogger("semantica.data")

# ----------------------------------------------------------------------------- page sources

def read_manifest(path):
    """CSV or JSONL manifest -> [(page, absolute path)] (paths relative to its folder; page ids as
    shards.page_id: 7 and 7.0 are one page). Read as utf-8-sig (a byte-order mark and CRLF line ends are
    fine); ValueError naming file and line of a bad row (no page id: null, NaN or blank; no path)."""
    base = os.path.dirname(os.path.abspath(path))
    try:
        rows = _manifest_rows(path)
    except UnicodeDecodeError as e:                      # an image or other binary file given as --data
        raise ValueError(f"{path}: not a UTF-8 .csv/.jsonl manifest (byte {e.start}: {e.reason}); --data takes a "
                         "pages folder ROOT/<page>/<image>, a manifest or 'synthetic'") from None
    for n, r in rows:
        if not isinstance(r, dict) or page_id(r.get("page")) is None or not isinstance(r.get("path"), str):
            raise ValueError(f"{path}:{n}: a row needs `page` (not null, NaN or blank) and `path` (a string), "
                             f"got {r!r}")
    return [(page_id(r["page"]), os.path.join(base, r["path"])) for _, r in rows]


def _manifest_rows(path):
    """[(line number, row)] of a CSV (csv.DictReader) or JSONL manifest, read as utf-8-sig."""
    rows = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        if path.endswith((".jsonl", ".json")):
            for n, line in enumerate(f, 1):
                try:
                    rows += [(n, json.loads(line))] if line.strip() else []
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON object ({e.msg})") from None
        else:
            reader = csv.DictReader(f)
            rows = [(reader.line_num, r) for r in reader]
    return rows


def scan(source, decode=False, max_pixels=None, **synthetic_kwargs):
    """Index a folder ROOT/<page>/... (find_images), a .csv/.jsonl manifest or "synthetic" -> (pages
    {page: [keys]}, skipped {path: reason}). Files are checked cheaply (header + verify; decode=True
    decodes fully, catching truncated JPEGs). ValueError for an unknown source."""
    if source == "synthetic":
        pages = SyntheticPages(**synthetic_kwargs)
        return {str(p): [pages.key(p, i) for i in range(pages.count(p))] for p in range(len(pages))}, {}
    if os.path.isdir(source):
        rel = [(path, path.relative_to(source).parts) for path in find_images(source, extensions=None)]
        entries = [(parts[0] if len(parts) > 1 else None, str(path)) for path, parts in rel]
    elif os.path.isfile(source):
        entries = read_manifest(source)
    else:
        raise ValueError(f"{source}: not a folder, a .csv/.jsonl manifest or 'synthetic'")
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

    def __init__(self, pages, image_size, max_pixels=None):
        self.names, self.files = list(pages), [list(pages[n]) for n in pages]
        self.image_size, self.max_pixels = image_size, max_pixels

    def __len__(self):
        return len(self.names)

    def count(self, page):
        return len(self.files[page])

    def key(self, page, index):
        return self.files[page][index]

    def label(self, page):
        return self.names[page]                          # the class folder for label-grouped data (§8.3)

    def image(self, page, index, size=None):
        return load_image(self.files[page][index], size or self.image_size, self.max_pixels)

    def fingerprint(self):
        """Changes whenever a file is added, removed or rewritten (absolute path, size, mtime)."""
        h = hashlib.sha1()
        for f in (f for files in self.files for f in files):
            st = os.stat(f)
            h.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()


def open_pages(source, image_size, decode=False, max_pixels=None, **synthetic_kwargs):
    """scan + wrap -> (pages object, skipped); ValueError for an unknown source or no usable image."""
    if is_pattern(source):
        raise ValueError(f"{source}: page shards are streamed (train.py --data, stream.ShardStream), not indexed")
    if source == "synthetic":
        return SyntheticPages(image_size=image_size, **synthetic_kwargs), {}
    pages, skipped = scan(source, decode, max_pixels)
    if not pages:
        raise ValueError(f"{source}: no usable images ({len(skipped)} skipped)")
    return FilePages(pages, image_size, max_pixels), skipped


# ----------------------------------------------------------------------------- pairs and the §5 filter

def build_pairs(pages, encoder, cache_dir, low=None, high=None, max_pairs_per_page=MAX_PAIRS_PER_PAGE,
                histogram_png=None, cond_cache=None):
    """§5 filtered (page, cond, target) pairs -> (LongTensor (K, 3), report). low/high default to
    filter_band(encoder); the filter embeddings (embeddings.filter_embeddings: one definition) come from
    `cond_cache` when given (encoder may be None), else from an encoder pass; the selection is
    pairs.select_pairs (the sharded pass runs the same function, with the same candidate subsets).
    Pairs touching an undecodable image are dropped (`unreadable`)."""
    if cond_cache is not None:
        cache = CondCache.open(cond_cache, pages, encoder)
        (emb, valid), name = cache.filter_embeddings(), cache.meta["encoder"]
    else:
        (emb, valid), name = cached_embeddings(pages, encoder, cache_dir), encoder.name
    band = filter_band(name) if low is None or high is None else (low, high)
    low, high = band[0] if low is None else low, band[1] if high is None else high
    kept, counts, cos = select_pairs(pages, emb, valid, low, high, max_pairs_per_page)
    report = {"encoder": name, **counts, "histogram": histogram_text(cos, low, high)}
    if histogram_png and pairs_histogram_png(histogram_png, histogram_counts(cos, 50), low, high, name):
        report["histogram_png"] = histogram_png
    return kept, report


# ----------------------------------------------------------------------------- pair dataset + loader

class PagePairs(torch.utils.data.Dataset):
    """Map-style (cond, target) pairs, deterministic in (seed, index); bad arguments: ValueError.

    mode "page" (Eq. 3, §5): item k is two distinct images of page k % len of the pages with >= 2 images
    (singletons counted in .dropped_pages), drawn by an RNG seeded (seed, k); with `pairs`
    (build_pairs) item k is pairs[k % len]. mode "same" (Eq. 2, §4): image k % len is its own condition.
    `cond_cache` (encode_cache folder; checked against `pages` and `encoder` if given) serves the cached
    cond instead of the image: cond_kind "tokens" (T, D) for cross-attention, "global" (D,) for FiLM
    (§3.4). A failing image is logged and its item replaced by a deterministic other (10 in a row: error)."""

    def __init__(self, pages, mode="page", pairs=None, seed=0, cond_cache=None, cond_kind="tokens", encoder=None):
        if mode not in ("page", "same") or (pairs is not None and mode != "page"):
            raise ValueError(f"mode must be 'page' (optionally with filtered pairs) or 'same', got {mode!r}")
        if cond_kind not in ("tokens", "global"):
            raise ValueError(f"cond_kind must be 'tokens' or 'global', got {cond_kind!r}")
        self.cond = None if cond_cache is None else CondCache.open(cond_cache, pages, encoder)
        self.pages, self.mode, self.pairs, self.seed, self.cond_kind = pages, mode, pairs, seed, cond_kind
        counts = [pages.count(p) for p in range(len(pages))]
        self.multi = np.array([p for p, n in enumerate(counts) if n >= 2], dtype=np.int64)
        self.dropped_pages = len(counts) - len(self.multi) if mode == "page" else 0
        if self.dropped_pages:
            log.info("page mode: dropped %d pages with fewer than two images", self.dropped_pages)
        self.images = np.array([(p, i) for p, n in enumerate(counts) for i in range(n)], dtype=np.int64)
        self._bad = set()
        if len(self) == 0:
            raise ValueError(f"no training items in mode {mode!r} ({self.dropped_pages} singleton pages dropped)")

    def __len__(self):
        if self.mode == "same":
            return len(self.images)
        return len(self.pairs) if self.pairs is not None else len(self.multi)

    def pair(self, index):
        """-> (page, cond_idx, target_idx) of item `index` (any non-negative int)."""
        if self.mode == "same":
            p, i = self.images[index % len(self.images)]
            return int(p), int(i), int(i)                # Eq. 2: the condition is the target
        if self.pairs is not None:
            return tuple(int(v) for v in self.pairs[index % len(self.pairs)])
        p = int(self.multi[index % len(self.multi)])     # Eq. 3: another image of the same page
        c, t = np.random.default_rng([self.seed, index]).choice(self.pages.count(p), 2, replace=False)
        return p, int(c), int(t)

    def __getitem__(self, index):
        for attempt in range(10):
            p, c, t = self.pair(index)
            try:
                cond = self.pages.image(p, c) if self.cond is None else self.cond.get(p, c, self.cond_kind)
                target = cond if (c == t and self.cond is None) else self.pages.image(p, t)
                return cond, target
            except Exception as e:
                new = int(np.random.default_rng([self.seed, index, attempt, 1]).integers(1 << 62))
                key = (self.pages.key(p, c), self.pages.key(p, t))
                if key not in self._bad:
                    self._bad.add(key)
                    q, qc, qt = self.pair(new)
                    log.warning("item %d (%s, %s) failed: %s: %s; replaced by item %d (%s, %s)", index, *key,
                                type(e).__name__, e, new, self.pages.key(q, qc), self.pages.key(q, qt))
                index = new
        raise RuntimeError(f"10 consecutive items failed to load; last: {key}")


class StepSampler(torch.utils.data.Sampler):
    """Infinite per-rank batches of dataset indices, deterministic in (seed, rank, world_size).

    Epoch e is a permutation of range(N) seeded by (seed, e); rank r takes positions r, r+W, ... of
    its first (N // W) * W entries (DESIGN: the last N % W of each epoch are dropped, so ranks yield
    equally many and their shards are disjoint), emitted as e * N + i so PagePairs draws a fresh pair
    per epoch. `start` skips batches already consumed: batch k with start=s is batch s + k with start=0.
    """

    def __init__(self, n, batch_size, rank, world_size, seed=0, start=0):
        if not 0 <= rank < world_size or n < world_size:
            raise ValueError(f"rank {rank} of {world_size} cannot take a share of {n} items")
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world_size
        self.seed, self.start = seed, start
        self.per_rank = n // world_size

    def _epoch(self, e):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + e))
        return (perm[: self.per_rank * self.world][self.rank::self.world] + e * self.n).tolist()

    def __iter__(self):
        e, off = divmod(self.start * self.batch_size, self.per_rank)  # items of this rank's stream consumed
        buf = self._epoch(e)[off:]
        while True:
            while len(buf) < self.batch_size:
                e += 1
                buf += self._epoch(e)
            yield buf[: self.batch_size]
            buf = buf[self.batch_size:]


def make_loader(dataset, batch_size, rank, world_size, seed, start=0, num_workers=0):
    """Infinite DataLoader of (cond, target) batches for one rank (rank/world explicit: DDP or XLA).
    `start` = batches this rank already consumed (from the checkpoint: step x accumulation). A ShardStream
    (which knows its rank, world and seed) gets a StreamLoader; `start` is then its position() or None."""
    if isinstance(dataset, ShardStream):
        return StreamLoader(dataset, batch_size, num_workers, start=start or None)
    sampler = StepSampler(len(dataset), batch_size, rank, world_size, seed, start)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    """`python data.py scan|synth|encode|shard|filter ...`; user errors end in one argparse-style line (exit 2)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sc = sub.add_parser("scan", help="index a folder / manifest / 'synthetic' and print a JSON summary")
    sy = sub.add_parser("synth", help="write synthetic pages as PNG folders (synthetic.py)")
    en = sub.add_parser("encode", help="§3.2: precompute every image's encoder tokens + global embedding")
    sh = sub.add_parser("shard", help="write page shards (WebDataset layout, one sample per page; shards.py)")
    fi = sub.add_parser("filter", help="§5 filter pass over page shards into new shards (torchrun: each rank its shards)")
    sc.add_argument("source", help="folder ROOT/<page>/<image>, .csv/.jsonl manifest, 'synthetic', or page shards "
                    "'DIR/{000000..000099}.tar' (read in full: page / image counts, filter bands)")
    en.add_argument("source", help="folder ROOT/<page>/<image>, .csv/.jsonl manifest, or 'synthetic'")
    for p in (sc, en):
        p.add_argument("--encoder-weights", "--weights", dest="weights", help="local encoder weights file")
        p.add_argument("--max-pixels", type=int, help="decompression-bomb limit (default: Pillow's; 0 = none)")
        p.add_argument("--seed", type=int, default=0, help="synthetic pages' seed (and a random encoder's)")
    sc.add_argument("--encoder", help="encoders.py preset name: also count pairs before/after filtering")
    sc.add_argument("--random-encoder", action="store_true", help="allow random weights (smoke runs only)")
    sc.add_argument("--decode", action="store_true", help="fully decode every file (catches truncation)")
    sc.add_argument("--cache-dir", default=".cache/semantica", help="embedding cache folder")
    sc.add_argument("--cond-cache", help="read the filter's embeddings from this `encode` folder")
    sc.add_argument("--histogram", help="PNG path for the similarity histogram (needs matplotlib)")
    sc.add_argument("--pages", type=int, default=2000, help="number of synthetic pages")
    en.add_argument("out", help="cache folder to write")
    en.add_argument("--encoder", required=True, help="encoders.py preset name")
    en.add_argument("--random-encoder", action="store_true", help="allow random weights (smoke runs only)")
    en.add_argument("--image-size", type=int, required=True, help="training resolution (train.py's image size)")
    en.add_argument("--pages", type=int, default=2048, help="number of synthetic pages (train.py --num-pages)")
    en.add_argument("--batch-size", type=int, default=64)
    en.add_argument("--overwrite", action="store_true", help="replace an existing cache in OUT")
    sh.add_argument("source", help="folder ROOT/<page>/<image>, .csv/.jsonl manifest, 'synthetic' or an img2dataset "
                    "output folder (with --page-key)")
    sh.add_argument("out", help="new folder for OUT/000000.tar, ...")
    sh.add_argument("--per-shard", type=int, default=1000, help="pages per shard")
    sh.add_argument("--page-key", help="img2dataset source: the .json column holding the page / document id")
    sh.add_argument("--pages", type=int, default=2048, help="number of synthetic pages (train.py --num-pages)")
    sh.add_argument("--size", type=int, default=64, help="synthetic image size")
    fi.add_argument("pattern", help="page shards, e.g. 'shards/{000000..000099}.tar'")
    fi.add_argument("out", help="new folder for the filtered shards (same names), filter.json, filter.png")
    fi.add_argument("--encoder", required=True, help="encoders.py preset name (its App. C band is the default)")
    fi.add_argument("--random-encoder", action="store_true", help="allow random weights (smoke runs only)")
    fi.add_argument("--filter-low", type=float, help="lower cosine bound (default: the encoder's, App. C)")
    fi.add_argument("--filter-high", type=float, help="upper cosine bound (default: the encoder's, App. C)")
    fi.add_argument("--image-size", type=int, help="also store float16 conditioning tokens at this training size (§3.2)")
    fi.add_argument("--batch-size", type=int, default=64)
    fi.add_argument("--encoder-weights", "--weights", dest="weights", help="local encoder weights file")
    for p in (sc, en, fi):
        p.add_argument("--encoder-act", choices=encoders.CLIP_ACTIVATIONS, help="MLP activation of a CLIP weights file "
                       "that does not record it (OpenCLIP visual.* state dicts): quick_gelu (OpenAI weights) or gelu "
                       "(LAION, DataComp); default: from the file or the family")
    for p in (sh, fi):
        p.add_argument("--max-pixels", type=int, help="decompression-bomb limit (default: Pillow's; 0 = none)")
    sh.add_argument("--seed", type=int, default=0, help="synthetic pages' seed")
    fi.add_argument("--seed", type=int, default=0, help="a random encoder's seed (--random-encoder)")
    sy.add_argument("out")
    sy.add_argument("--pages", type=int, default=100)
    sy.add_argument("--size", type=int, default=64)
    sy.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name, least in (("batch_size", 1), ("image_size", 1), ("per_shard", 1), ("pages", 1), ("size", 1),
                        ("seed", 0), ("max_pixels", 0)):    # numbers nothing can be computed with: before any work
        value = getattr(args, name, None)
        if value is not None and value < least:
            ap.error(f"--{name.replace('_', '-')} must be >= {least}{' (0 = no limit)' * (name == 'max_pixels')}, "
                     f"got {value}")
    if args.cmd == "filter" and None not in (args.filter_low, args.filter_high):
        try:
            check_band(args.filter_low, args.filter_high)
        except ValueError as e:
            ap.error(f"--filter-low/--filter-high: {e}")
    if args.cmd == "scan" and is_pattern(args.source) and (args.encoder or args.cond_cache):
        ap.error("scan --encoder/--cond-cache takes a folder or manifest; on shards the §5 counts come from "
                 "data.py filter (OUT/filter.json)")
    if getattr(args, "histogram", None) and not (args.encoder or args.cond_cache):
        ap.error("--histogram needs --encoder or --cond-cache (the similarities come from an encoder)")
    if getattr(args, "histogram", None) and importlib.util.find_spec("matplotlib") is None:
        ap.error("--histogram needs matplotlib: pip install matplotlib (or drop --histogram)")
    if (args.cmd in ("encode", "filter") or args.cmd == "scan" and args.encoder) and not (args.weights or
                                                                                        args.random_encoder):
        ap.error(f"--encoder {args.encoder} without --encoder-weights has random weights; "
                 "pass --random-encoder to allow it")
    if args.cmd == "encode" and os.path.exists(os.path.join(args.out, "meta.json")) and not args.overwrite:
        ap.error(f"{args.out} already holds a conditioning cache; pass --overwrite or another folder")
    try:
        if args.cmd == "synth":
            SyntheticPages(args.pages, args.size, args.seed).write(args.out)
            return print(json.dumps({"out": args.out, "pages": args.pages, "size": args.size}))
        if args.cmd in ("shard", "filter"):
            return shard_commands(args)
        if is_pattern(args.source):                      # scan of page shards: counts, no image decoded
            return print(json.dumps(scan_shards(expand(args.source)), indent=1))
        kw = {"num_pages": args.pages, "seed": args.seed} if args.source == "synthetic" else {}
        encoder = None if not args.encoder else encoders.load_encoder(args.encoder, args.weights, seed=args.seed,
                                                                      act=args.encoder_act)
        if args.cmd == "encode":
            pages, skipped = open_pages(args.source, args.image_size, max_pixels=args.max_pixels, **kw)
            if encode_cache_torchrun(pages, encoder, args.out, args.batch_size) == 0:
                print(json.dumps({"out": args.out, "images": sum(pages.count(p) for p in range(len(pages))),
                                  "skipped": len(skipped), "encoder": encoder.name}))
            return
        pages, skipped = scan(args.source, args.decode, args.max_pixels, **kw)
        summary = {"pages": len(pages), "images": sum(map(len, pages.values())), "skipped": skipped,
                   "singleton_pages": sum(len(v) < 2 for v in pages.values())}
        if encoder is not None or args.cond_cache:
            size = encoder.image_size if args.cond_cache is None else CondCache(args.cond_cache).meta["image_size"]
            src = SyntheticPages(image_size=size, **kw) if args.source == "synthetic" else \
                FilePages(pages, size, args.max_pixels)
            _, report = build_pairs(src, encoder, args.cache_dir, histogram_png=args.histogram,
                                    cond_cache=args.cond_cache)
            print(report.pop("histogram"), file=sys.stderr)
            summary.update(report)
        print(json.dumps(summary, indent=1))
    except (ValueError, KeyError, OSError) as e:         # user errors: one line, exit 2
        ap.error(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e))


def shard_commands(args):
    """`shard` (write page shards) and `filter` (the sharded §5 pass); prints a JSON summary (rank 0)."""
    if args.cmd == "shard":
        skipped = {}                                     # the img2dataset rows left out count with the bad images
        if args.page_key:
            records = records_from_img2dataset(args.source, args.page_key, skipped)
        elif os.path.isdir(args.source) and any(f.endswith(".tar") for f in os.listdir(args.source)):
            raise ValueError(f"{args.source} holds .tar shards (img2dataset output?): pass --page-key COLUMN")
        else:
            kw = {"num_pages": args.pages, "seed": args.seed} if args.source == "synthetic" else {}
            records = records_from_pages(open_pages(args.source, args.size, max_pixels=args.max_pixels, **kw)[0])
        return print(json.dumps(write_shards(records, args.out, args.per_shard, skipped), indent=1))
    encoder = encoders.load_encoder(args.encoder, args.weights, seed=args.seed, act=args.encoder_act)
    band = filter_band(encoder.name) if args.filter_low is None or args.filter_high is None else None
    low = args.filter_low if args.filter_low is not None else band[0]
    high = args.filter_high if args.filter_high is not None else band[1]
    report = filter_shards_torchrun(args.pattern, args.out, encoder, low, high, args.image_size, args.batch_size,
                                    args.max_pixels)
    if report is not None:
        print(report.pop("histogram"), file=sys.stderr)
        print(json.dumps(report, indent=1))



if __name__ == "__main__":
    from machinery import flags
    flags.survive_lost_output()  # `| head`, a killed `| tee`: the command goes on
    main()
