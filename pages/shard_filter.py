"""The §5 pair filter as a sharded pass over page shards (Semantica §5, App. C; page shards: shards.py).

    torchrun --nproc_per_node=8 data.py filter 'shards/{000000..000999}.tar' filtered/ --encoder dinov2-b14 ...

Each rank filters its shards (shard s on rank s % world) and writes new shards with the same names into OUT:
each page gains `global.npy` (its images' §5 filter embeddings, embeddings.filter_embeddings: the folder
path's definition), optionally `tokens.npy` (float16 conditioning tokens at the training size, §3.2), and
page.json["filter"] with the kept pairs and the encoder's identity, chosen by pairs.select_pairs: the folder
path's function, so both paths keep the same pairs. OUT/filter.json holds the counts (unreadable and
truncated input shards included), the pattern of exactly the shards written, and the App. C / Fig. 8
histogram of pair similarities (filter.png with matplotlib); OUT/shards.json their page counts
(shards.write_index). A shard with no readable page gets no output shard; a pattern with no readable page
at all is refused before OUT is created.
"""
import io
import json
import logging
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from pages.embeddings import encode_images, encoder_fingerprint, filter_embeddings, filter_size
from pages.pairs import check_band, histogram_counts, histogram_png, histogram_text, select_pairs
from pages.shards import decode, expand, first_page, pattern_of, read_pages, shard_stats, webdataset, write_index

log = logging.getLogger("semantica.shards")

COUNTS = ("shards", "unreadable_shards", "truncated_shards", "pages", "unreadable_images", "pairs_before",
          "pairs_after", "dropped_low", "dropped_high", "unreadable")  # filter.json's sums over ranks and shards


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
        return f"{self.records[page]['url']}:{self.records[page]['key']}/{self.records[page]['names'][index]}"

    def label(self, page):
        return self.records[page]["meta"].get("page", self.records[page]["key"])

    def image(self, page, index, size=None):
        return decode(self.records[page]["images"][index], size or self.image_size, self.max_pixels)

    def fingerprint(self):
        return "|".join(f"{r['url']}:{r['key']}:{len(r['images'])}" for r in self.records)


def npy(array):
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def encoder_meta(encoder):
    """What page.json["filter"] records of the encoder: its name, fingerprint, weights file and random-init seed."""
    return {"encoder": encoder.name, "encoder_fingerprint": encoder_fingerprint(encoder),
            "encoder_weights": getattr(encoder, "weights", None), "encoder_seed": getattr(encoder, "seed", None)}


@torch.no_grad()
def filter_shards(urls, out, encoder, low, high, rank=0, world=1, image_size=None, batch_size=64, max_pixels=None):
    """§5 / App. C filter of page shards, shard s by rank s % world: OUT/<same name>.tar per input shard with
    page.json["filter"] = {encoder_meta, low, high, pairs [[cond, target], ...], valid, token_size}, pairs
    chosen by pairs.select_pairs (candidates seeded by page.json's "index", as the folder path's page number),
    `global.npy` (n, E) float16 filter embeddings (embeddings.filter_embeddings) and, with image_size,
    `tokens.npy` (n, T, D) float16 conditioning tokens at that training size (§3.2). An input shard with no
    readable page (missing, empty, corrupt) is logged and counted, and gets no output shard; a truncated one
    keeps the pages before the cut (counted). -> this rank's COUNTS, histogram counts (20 and 50 bins) and
    "index" {output file name: shards.shard_stats}."""
    wds, device, who = webdataset(), next(encoder.parameters()).device, encoder_meta(encoder)
    total = {**{k: 0 for k in COUNTS}, "hist20": np.zeros(20, np.int64), "hist50": np.zeros(50, np.int64), "index": {}}
    t0 = time.time()
    for s in range(rank, len(urls), world):
        status = {}
        pages = ShardPages(list(read_pages(urls[s], status, quiet=True)), filter_size(encoder), max_pixels)
        if not len(pages):
            total["unreadable_shards"] += 1
            log.warning("shard %s: no readable page (%s): no output shard", urls[s], status.get("error", "empty"))
            continue
        if "error" in status:
            total["truncated_shards"] += 1
            log.warning("shard %s: truncated after %d samples (%s): its %d complete pages are filtered", urls[s],
                        status["samples"], status["error"], len(pages))
        emb, valid = filter_embeddings(pages, encoder, batch_size, device, desc=f"filter {urls[s]}")
        ids = [r["meta"].get("index", p) for p, r in enumerate(pages.records)]
        kept, counts, cos = select_pairs(pages, torch.from_numpy(emb), torch.from_numpy(valid), low, high,
                                         page_ids=ids)
        tokens = None
        if image_size:
            tokens, sized = {}, ShardPages(pages.records, image_size, max_pixels)
            for idx, ok, (tok,) in encode_images(sized, lambda x: encoder(encoder.preprocess(x))[1:], image_size,
                                                 batch_size=batch_size, device=device, desc=f"tokens {urls[s]}"):
                tokens.update({int(g): t for g, t in zip(idx, tok.astype(np.float16))})
        path, offset, written = os.path.join(out, os.path.basename(urls[s])), 0, []
        with wds.TarWriter(path + ".tmp", encoder=False, mtime=0) as writer:
            for p, r in enumerate(pages.records):
                c = pages.count(p)
                mine = kept[kept[:, 0] == p][:, 1:].tolist()
                meta = {**r["meta"], "filter": {**who, "low": low, "high": high, "pairs": mine,
                                                "valid": valid[offset:offset + c].tolist(), "token_size": image_size}}
                written.append((c, meta["filter"]))
                members = dict(zip(r["names"], r["images"]))   # the image bytes, copied as they are
                members["global.npy"] = npy(emb[offset:offset + c])
                if tokens is not None and c:
                    members["tokens.npy"] = npy(np.stack([tokens[g] for g in range(offset, offset + c)]))
                writer.write({"__key__": r["key"], **members, "page.json": json.dumps(meta).encode()})
                offset += c
        os.replace(path + ".tmp", path)
        total["index"][os.path.basename(path)] = shard_stats(written)
        total["shards"], total["pages"] = total["shards"] + 1, total["pages"] + len(pages)
        total["unreadable_images"] += int((~valid).sum())
        for k in ("pairs_before", "pairs_after", "dropped_low", "dropped_high", "unreadable"):
            total[k] += counts[k]
        total["hist20"] += histogram_counts(cos, 20)
        total["hist50"] += histogram_counts(cos, 50)
        print(f"rank {rank}: {urls[s]} -> {path}: {len(pages)} pages, {counts['pairs_after']}/{counts['pairs_before']} "
              f"pairs kept ({time.time() - t0:.0f} s)", file=sys.stderr)
    return total


def check_filter_inputs(pattern, out, low, high):
    """The refusals of a filter pass, before anything is written -> the shard URLs. ValueError for a bad band
    (pairs.check_band), a pattern that is not one of .tar shards, two shards with one file name, an OUT that
    already holds shards, or no readable page in any shard (each unreadable shard before the first readable
    page is logged)."""
    check_band(low, high)
    urls = expand(pattern)
    names = [os.path.basename(u) for u in urls]
    if len(set(names)) != len(names):
        name = next(n for n in names if names.count(n) > 1)
        twice = [u for u in urls if os.path.basename(u) == name][:2]
        raise ValueError(f"{pattern}: two shards share a file name ({twice[0]}, {twice[1]}); the outputs would "
                         f"overwrite each other: filter each set into its own folder and join the outputs with ::")
    if os.path.isdir(out) and any(f.endswith(".tar") for f in os.listdir(out)):
        raise ValueError(f"{out} already holds .tar shards; choose another folder (nothing is overwritten)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{out} is a file, not a folder")
    first_page(urls, limit=None)
    return urls


def filter_shards_torchrun(pattern, out, encoder, low, high, image_size=None, batch_size=64, max_pixels=None):
    """filter_shards alone or under torchrun (RANK, WORLD_SIZE; gloo for the barrier; each rank's encoder on
    its own GPU when there are GPUs). Rank 0 then sums every rank's counts into OUT/filter.json with the
    text histogram (App. C, Fig. 8) and the pattern of exactly the shards written (shards.pattern_of, in
    input order), OUT/filter.png (matplotlib) and OUT/shards.json. -> the report on rank 0, else None.
    ValueError (check_filter_inputs) before OUT is created."""
    urls = check_filter_inputs(pattern, out, low, high)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("gloo")
        dist.barrier()                                   # every rank checked OUT before any writes
    if torch.cuda.is_available():
        encoder.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    os.makedirs(out, exist_ok=True)
    total = filter_shards(urls, out, encoder, low, high, rank, world, image_size, batch_size, max_pixels)
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
    index = {name: stats for p in parts for name, stats in p["index"].items()}
    write_index(out, index)
    written = [os.path.join(out, os.path.basename(u)) for u in urls if os.path.basename(u) in index]
    report = {"pattern": pattern_of(written), "encoder": encoder.name, "low": low, "high": high,
              **{k: sum(p[k] for p in parts) for k in COUNTS}}
    if report["unreadable_shards"] or report["truncated_shards"]:
        log.warning("%d of %d shards had no readable page (no output shard), %d were truncated (see the warnings "
                    "above)", report["unreadable_shards"], len(urls), report["truncated_shards"])
    hist20, hist50 = (np.sum([p[k] for p in parts], axis=0) for k in ("hist20", "hist50"))
    report["histogram"] = histogram_text(None, low, high, counts=hist20)
    png = histogram_png(os.path.join(out, "filter.png"), hist50, low, high, encoder.name)
    if png:
        report["histogram_png"] = png
    with open(os.path.join(out, "filter.json.tmp"), "w") as f:
        json.dump({**report, "histogram_counts": hist50.tolist()}, f, indent=1)
    os.replace(os.path.join(out, "filter.json.tmp"), os.path.join(out, "filter.json"))
    return report
