"""Streaming training pairs from page shards (Semantica §5 at web scale), with an exactly resumable position.

`train.py --data 'shards/{000000..000999}.tar'` trains from shards.py's page shards; the brace pattern is only
expanded, and before the first item each shard's number of training items is read from the shards.json next
to it (shards.write_index: `data.py shard` and `data.py filter` write one; a local shard without it is
counted by reading it once). The stream is split into READERS: reader u = rank x W + worker of U = world x W
(W = DataLoader workers, at least 1). A global epoch e is one order of all items: the shards in a (seed, e)
permutation, each shard's items in shard order; reader u reads the ((u + e) mod U)-th of U equal slices of it
(sizes differ by at most one item; the rotation evens that out over epochs), so one global epoch draws every
item once and the readers keep step (an epoch ends within U x batch items everywhere). DESIGN: contiguous
slices keep reading sequential (a shard on a slice boundary is read by both of its readers, each taking its
own items); the shuffle buffer below mixes within a reader. Shards that cannot be counted (remote shards
without a shards.json) are said in one logged line, and the stream falls back to shards u, u + U, ... of the
permutation per reader, each reader on its own epochs (U may not exceed the number of shards).
A reader reads its shards in windows of WINDOW_SHARDS; within a window its items pass a shuffle buffer
(`shuffle_buffer` items, DESIGN) whose random numbers come from (seed, epoch, reader, window), and the buffer
is emptied at the window's end. Items, as the folder path (data.PagePairs): `--pairs page` = one pair of two
different images per page per epoch (Eq. 3, §5; drawn from (seed, epoch, reader, window, page)), or the
filter pass's kept pairs when the run filters (§5, App. C; pages filtered with the run's band and encoder);
`--pairs same` = every image as its own condition (Eq. 2, §4).

Position: each sample carries its reader's state after it (epoch, window, items out of the window's
buffer, and the counters below); StreamLoader records the state of the last batch each reader delivered and
the layout (a digest of the item counts), and the checkpoint stores it. Resuming skips earlier windows
without opening their shards and replays the current window's buffer without decoding an image: exact, at
the cost of re-reading at most one window; shards whose counts changed since are refused.
Counted and logged: pages with fewer than 2 usable images (skipped), pages without the run's filter
result, unreadable members (shards.decode's reason), shards that are missing, unreadable or truncated (the
pages before the cut are kept). Shards without any item raise NoUsablePage before training; a reader whose
epoch yields nothing raises it too (one line, also from a DataLoader worker).
"""
import hashlib
import json
import logging

import numpy as np
import torch

from pages import embeddings
from pages import shards

log = logging.getLogger("semantica.stream")

WINDOW_SHARDS = 4  # DESIGN: shards per re-creatable shuffle window; a resume re-reads at most this many per reader
STATE = ("epoch", "window", "out", "skipped_pages", "unfiltered_pages", "bad_members", "bad_shards")  # a reader's position
FORMAT = "semantica-stream/1"


class NoUsablePage(ValueError):
    """A reader read a whole epoch of its shards without one training item: nothing to train on."""


def shuffled(items, size, rng):
    """A shuffle buffer of `size` items (size 1 = stream order), emptied in random order at the end."""
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        k = int(rng.integers(size))
        yield buf[k]
        buf[k] = item
    while buf:
        k = int(rng.integers(len(buf)))
        buf[k], buf[-1] = buf[-1], buf[k]
        yield buf.pop()


class ShardStream(torch.utils.data.IterableDataset):
    """Infinite (cond, target, state (len(STATE),) int64, page id) samples of one rank from page shards.

    target: float (3, S, S) in [-1, 1]; cond: the condition image (3, S, S), or with cond="tokens" the
    shards' float16 conditioning tokens as float32 (T, D) (shard_filter.filter_shards with a token size, §3.2).
    band=(low, high): use the kept pairs of pages filtered with exactly that band (§5, App. C) and, given the
    run's `encoder`, by those weights (page.json's encoder_fingerprint: the filter's encoder is the one that
    conditions, §5); None: unfiltered page pairs. `epochs` ends the stream after that many epochs (tests).
    ValueError for bad arguments. The position to start from is set by StreamLoader (`start`)."""

    def __init__(self, pattern, image_size, mode="page", band=None, cond="pixels", seed=0, rank=0, world=1,
                 shuffle_buffer=1000, max_pixels=None, epochs=None, encoder=None):
        if mode not in ("page", "same") or (band is not None and mode != "page"):
            raise ValueError(f"mode must be 'page' (optionally filtered) or 'same', got {mode!r}")
        if cond not in ("pixels", "tokens") or shuffle_buffer < 1:
            raise ValueError(f"cond must be 'pixels' or 'tokens' and shuffle_buffer >= 1, got {cond!r}, {shuffle_buffer}")
        self.urls = shards.expand(pattern)
        self.image_size, self.mode, self.band, self.cond, self.seed = image_size, mode, band, cond, seed
        self.rank, self.world, self.shuffle_buffer, self.max_pixels, self.epochs = rank, world, shuffle_buffer, max_pixels, epochs
        self.filtered_by = None if encoder is None or band is None else embeddings.encoder_fingerprint(encoder)
        self.counts, self.layout, self.planned = None, None, False   # plan()
        self.start = None  # {"workers": W, "units": [state per worker], "rotation": r} (StreamLoader)

    def items_in(self, stats):
        """Training items of a shard by its shards.shard_stats: images (mode "same"), pages with >= 2 images
        (page pairs) or pairs kept with this band (and encoder)."""
        if self.mode == "same":
            return stats["images"]
        if self.band is None:
            return stats["multi"]
        kept = stats["pairs"].get(shards.band_key(self.band), {})
        return kept.get(self.filtered_by, 0) if self.filtered_by else sum(kept.values())

    def plan(self, readers, start=None):
        """Fix the epoch layout once, before the first item: self.counts (training items per shard, from
        shards.json or counted by reading a local shard) and self.layout (their digest), or both None when a
        shard cannot be counted (remote): said in one logged line (rank 0). `start` (a
        StreamLoader position) keeps its layout: one recorded without (None) continues so, one with other
        counts is refused (ValueError). NoUsablePage when the shards hold no item; ValueError when there are
        fewer items than `readers`."""
        if self.planned:
            return
        stats = shards.read_index(self.urls)
        unindexed = [k for k, e in enumerate(stats) if e is None and not self.urls[k].startswith(shards.REMOTE)]
        if unindexed and self.rank == 0:
            log.warning("counting the pages of %d shards without a %s (read once; data.py shard and filter write it)",
                        len(unindexed), shards.INDEX)
        for k in unindexed:
            stats[k] = shards.shard_stats((len(r["images"]), r["meta"].get("filter"))
                                          for r in shards.read_pages(self.urls[k], quiet=True))
        remote = sum(e is None for e in stats)
        counts = None if remote else np.array([self.items_in(e) for e in stats], np.int64)
        layout = None if remote else hashlib.sha1(json.dumps([self.urls, counts.tolist()]).encode()).hexdigest()[:16]
        why = f"{remote} of {len(self.urls)} shards are remote (their items are not counted)" if remote else None
        if start is not None and start.get("layout") != layout:
            if start.get("layout") is not None:
                raise ValueError("the shards' training items changed since the checkpoint (another pattern, other "
                                 f"shards or another {shards.INDEX}): the stream cannot continue its epochs exactly")
            counts, layout, why = None, None, "the checkpoint's position was recorded without balanced epochs"
        if counts is not None and counts.sum() == 0:
            pages, multi = (sum(e[k] for e in stats) for k in ("pages", "multi"))
            band = "; none filtered with this band and encoder, or the band kept no pair" if self.band else ""
            raise NoUsablePage(f"no usable page in the {len(self.urls)} shards ({pages} pages, {pages - multi} pages "
                               f"with < 2 images{band})")
        if counts is not None and counts.sum() < readers:
            raise ValueError(f"{counts.sum()} training items cannot feed {readers} readers (world x workers): use "
                             "fewer workers")
        if why and self.rank == 0:
            log.warning("data stream not balanced (%s): each reader runs its own epochs over its own shards, so one "
                        "global pass can draw some pages twice and others not at all", why)
        self.counts, self.layout, self.planned = counts, layout, True

    def reader_shards(self, unit, units, epoch):
        """Reader `unit`'s shards in `epoch` as [(url, lo, hi)]: its items are those numbered lo <= j < hi (hi
        None: to the end) in each shard's order. Balanced: the ((unit + epoch) mod units)-th of `units` equal
        slices of the epoch's items (shards in a (seed, epoch) permutation); a shard without items goes to the
        reader whose slice holds its place. Fallback (no counts): shards unit, unit + units, ... of the
        permutation, whole."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))
        if self.counts is None:
            return [(self.urls[i], 0, None) for i in order[unit::units]]
        ends = np.cumsum(self.counts[order]).tolist()
        n, k = ends[-1], (unit + epoch) % units
        a, b = n * k // units, n * (k + 1) // units
        pieces = []
        for i, end in zip(order, ends):
            first = end - int(self.counts[i])
            if (a < end and first < b) if end > first else (a <= first < b or first == b == n):
                pieces.append((self.urls[i], max(a - first, 0), None if end <= b else b - first))
        return pieces

    def expand_pages(self, pieces, counters):
        """Items (page record, cond index, target index, record number in the window) of `pieces`
        (reader_shards), in order; a page pair to draw later has indices None. Item j of a shard is this
        reader's when lo <= j < hi; a page that gives no item (fewer than 2 images, not filtered with this
        band and encoder) and a shard's read error are counted by the reader of the next item number."""
        number = 0
        for url, lo, hi in pieces:
            own, status, j = range(lo, hi if hi is not None else 1 << 62), {}, 0
            records = shards.read_pages(url, status)
            for rec in records:
                if j >= own.stop:
                    break
                n, f = len(rec["images"]), rec["meta"].get("filter") or {}
                if self.mode == "same":                  # Eq. 2: every image is its own condition
                    items = [(i, i) for i in range(n)]
                elif n < 2:
                    items, counters[3] = [], counters[3] + (j in own)   # a page pair needs two images
                elif self.band is None:
                    items = [(None, None)]               # Eq. 3: a pair drawn when decoded
                elif [f.get("low"), f.get("high")] != list(self.band) or \
                        self.filtered_by not in (None, f.get("encoder_fingerprint")):
                    items = []
                    if j in own:
                        counters[4] += 1
                        log.warning("page %s of %s skipped: not filtered with [%s, %s] by this encoder (data.py "
                                    "filter)", rec["key"], rec["url"], *self.band)
                else:
                    items = f["pairs"]                   # §5: the kept pairs
                for c, t in items:
                    if j in own:
                        yield rec, c, t, number
                    j += 1
                number += 1
            else:
                counters[6] += "error" in status and j in own   # missing, corrupt or truncated (read_tar logged it)
            records.close()

    def items(self, unit, units, state):
        """(record, cond, target, draw, counters) of reader `unit` from `state` (STATE values) on; counters is
        the reader's live STATE list (sample() adds to it; copy it after). The first window is replayed
        without decoding up to state's `out`."""
        self.plan(units)
        state = list(state) + [0] * (len(STATE) - len(state))      # a position from before bad_shards was counted
        epoch, window, done = state[:3]
        counters = list(state)
        while self.epochs is None or epoch < self.epochs:
            pieces, produced = self.reader_shards(unit, units, epoch), False
            for w in range(window, -(-len(pieces) // WINDOW_SHARDS)):
                rng = np.random.default_rng([self.seed, epoch, unit, w])
                items = self.expand_pages(pieces[w * WINDOW_SHARDS:(w + 1) * WINDOW_SHARDS], counters)
                for out, (rec, c, t, j) in enumerate(shuffled(items, self.shuffle_buffer, rng), 1):
                    produced = True
                    if w == window and out <= done:     # replay after a resume: no decoding
                        if out == done:
                            counters[3:] = state[3:]     # the counters as they were when the checkpoint was taken
                        continue
                    counters[:3] = epoch, w, out
                    yield rec, c, t, (epoch, unit, w, j), counters   # the caller adds its decoding counts
            if not produced and not (window or done):
                raise NoUsablePage(
                    f"reader {unit} of {units} got no usable page from its {len(pieces)} shards in epoch {epoch} (so far "
                    f"{counters[6]} unreadable shards, {counters[3]} pages with < 2 images, {counters[4]} pages not "
                    f"filtered with this band{'' if self.band is None else '; or the band kept no pair'})")
            epoch, window, done = epoch + 1, 0, 0

    def load(self, rec, index, counters):
        """Image `index` of a page record (float (3, S, S)), or None with a logged reason (counted)."""
        try:
            return shards.decode(rec["images"][index], self.image_size, self.max_pixels)
        except Exception as e:
            counters[5] += 1
            log.warning("shard %s page %s: member %s skipped (%s)", rec["url"], rec["key"], rec["names"][index], e)
            return None

    def sample(self, rec, c, t, draw, counters):
        """(cond, target) of one item, or None when it cannot be made (logged and counted)."""
        if c is None:                                    # Eq. 3: two distinct usable images of the page
            rng, alive, got = np.random.default_rng([self.seed, *draw]), list(range(len(rec["images"]))), {}
            while len(alive) >= 2:
                c, t = (int(v) for v in rng.choice(alive, 2, replace=False))
                for i in (c, t):
                    got[i] = got[i] if i in got else self.load(rec, i, counters)
                bad = [i for i in (c, t) if got[i] is None]
                if not bad:
                    break
                alive = [i for i in alive if i not in bad]
            else:
                counters[3] += 1                         # fewer than 2 usable images
                return None
            target, cond = got[t], got[c]
        else:
            target = self.load(rec, t, counters)
            cond = target if c == t else self.load(rec, c, counters)
        if target is None or cond is None:
            return None
        if self.cond == "tokens":                        # §3.2: precomputed conditioning tokens
            tokens = rec["arrays"].get("tokens")
            if tokens is None:
                counters[5] += 1
                log.warning("shard %s page %s: no tokens.npy (data.py filter --image-size)", rec["url"], rec["key"])
                return None
            cond = torch.from_numpy(tokens[c].astype(np.float32))
        return cond, target

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start = self.start or {"workers": workers, "units": [[0] * len(STATE)] * workers, "rotation": 0}
        if start["workers"] != workers:
            raise ValueError(f"stream position recorded with {start['workers']} workers, now {workers}")
        local = (worker + start["rotation"]) % workers   # the reader this worker continues (StreamLoader)
        for rec, c, t, draw, counters in self.items(self.rank * workers + local, self.world * workers,
                                                     start["units"][local]):
            pair = self.sample(rec, c, t, draw, counters)
            if pair is not None:
                yield (*pair, torch.tensor(counters, dtype=torch.int64), str(rec["meta"].get("page", rec["key"])))

    def preview(self, n):
        """n (cond, image) from the first pages of the first shards (variation grids): image 0 of each page
        with >= 1 usable image; cond is that image, or its tokens with cond="tokens"."""
        found, counters = [], [0] * len(STATE)
        for url in self.urls:
            for rec in shards.read_pages(url):
                pair = self.sample(rec, 0, 0, None, counters) if rec["images"] else None
                if pair is not None:
                    found.append(pair)
                if len(found) == n:
                    return found
        raise ValueError(f"fewer than {n} usable images in {len(self.urls)} shards")


class StreamLoader:
    """(cond, target) batches of one rank from a ShardStream through a DataLoader, and its position.

    Batch k of a DataLoader over an IterableDataset comes from worker k % W, so StreamLoader knows which
    reader each batch came from and records that reader's state. `start` = a position() of the same rank
    and the same W: on resume, worker j continues reader (j + batches) % W, so the batch order continues.
    The epoch layout is fixed here, before training (ShardStream.plan: its refusals are ValueErrors)."""

    def __init__(self, dataset, batch_size, num_workers=0, start=None):
        workers = max(1, num_workers)
        if start is not None and start["workers"] != workers:
            raise ValueError(f"cannot resume a streaming run with another --num-workers (checkpoint "
                             f"{start['workers']}, now {workers}): readers own the shards")
        dataset.plan(dataset.world * workers, start)
        if dataset.counts is None and len(dataset.urls) < dataset.world * workers:
            raise ValueError(f"{len(dataset.urls)} shards cannot feed {dataset.world * workers} readers "
                             f"(world {dataset.world} x {workers} workers): write smaller shards or use fewer workers")
        self.workers, self.batches, self.layout = workers, (start or {}).get("batches", 0), dataset.layout
        self.units = [list(u) + [0] * (len(STATE) - len(u)) for u in start["units"]] if start else \
            [[0] * len(STATE) for _ in range(workers)]
        dataset.start = {"workers": workers, "units": self.units, "rotation": self.batches % workers}
        # iterated once: no persistent workers, so the workers end as soon as the iteration is dropped
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                                  pin_memory=torch.cuda.is_available())

    def __iter__(self):
        try:
            for cond, target, state, _ in self.loader:
                self.units[self.batches % self.workers] = state[-1].tolist()
                self.batches += 1
                yield cond, target
        except NoUsablePage as e:   # from a worker, torch re-raises it with the worker's traceback as its text
            last = str(e).rstrip().splitlines()[-1]
            raise NoUsablePage(last.partition("NoUsablePage: ")[2] or last) from None

    def position(self):
        """This rank's position: {"format", "workers", "batches", "units": [STATE values per worker], "layout"
        (ShardStream.plan's digest; None: unbalanced)}."""
        return {"format": FORMAT, "workers": self.workers, "batches": self.batches,
                "units": [list(u) for u in self.units], "layout": self.layout}


def summary(positions):
    """One log line from every rank's position(): epochs reached and the skip counters summed."""
    units = [u for p in positions for u in p["units"]]
    total = np.sum(units, axis=0) if units else np.zeros(len(STATE), np.int64)
    return (f"data stream: readers at epochs {min(u[0] for u in units)}-{max(u[0] for u in units)}; skipped "
            f"{total[3]} pages with < 2 usable images, {total[4]} pages without this filter, {total[5]} unreadable members"
            f", {total[6]} unreadable or truncated shards")
