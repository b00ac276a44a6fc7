"""Benchmark the streaming page-shard loader against the folder loader, and time to first batch.

Semantica §5 trains on pairs of images from one web page; at scale the pages live in tar shards
(shards.py) streamed by stream.py. This script writes N synthetic images (synthetic.SyntheticPages, PNG,
`--size` px) once as page folders and as page shards of the same files, then reads one epoch of page pairs
(Eq. 3: one pair of two different images per page) through
    folder   data.PagePairs(data.FilePages) + data.make_loader  (random access, one file per image)
    stream   stream.ShardStream + stream.StreamLoader             (sequential tar reads, shuffle buffer)
at the training size `--image-size` with `--workers` DataLoader workers, and prints pages/s (pairs/s) and
images/s (decoded: 2 per pair). Then it times the first batch of a stream over 10, 100 and 1000 tiny shards
(copies of one shard, with their shards.json): the pattern is only expanded and the page counts read from
shards.json, so this should not grow with the number of shards.

    nice python bench/shards.py                      # 10 000 images, 64 px files, 32 px training size
    python bench/shards.py --images 2000 --workers 2
"""
import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
import data  # noqa: E402
from pages import shards  # noqa: E402
from pages import stream  # noqa: E402
from pages import synthetic  # noqa: E402


def write_pages(root, images, size, seed=0):
    """ROOT/pages (page folders) and ROOT/shards (100 pages a shard) with about `images` images -> (folder,
    pattern, pages, images written)."""
    pages, n = 0, 0
    gen = synthetic.SyntheticPages(10 ** 6, size, seed=seed)
    while n < images:
        n, pages = n + gen.count(pages), pages + 1
    gen = synthetic.SyntheticPages(pages, size, seed=seed)
    gen.write(os.path.join(root, "pages"))
    summary = shards.write_shards(shards.records_from_pages(data.open_pages(os.path.join(root, "pages"), size)[0]),
                                  os.path.join(root, "shards"), per_shard=100)
    return os.path.join(root, "pages"), summary["pattern"], pages, n


def epoch_rate(loader, batches):
    """(seconds, items) for `batches` batches of a loader, the clock started at the first batch."""
    it = iter(loader)
    next(it)                                     # workers started, first shards opened
    t, items = time.perf_counter(), 0
    for _ in range(batches - 1):
        cond, target = next(it)[:2]
        items += len(target)
    return time.perf_counter() - t, items


def first_batch(pattern, image_size, batch, workers):
    """Seconds from building a ShardStream to holding its first batch."""
    t = time.perf_counter()
    loader = stream.StreamLoader(stream.ShardStream(pattern, image_size, "page", shuffle_buffer=100), batch, workers)
    next(iter(loader))
    return time.perf_counter() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=10_000, help="synthetic images written (pages of 2-8 images)")
    p.add_argument("--size", type=int, default=64, help="size of the written PNG files")
    p.add_argument("--image-size", type=int, default=32, help="training size the loaders decode to")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of both loaders")
    args = p.parse_args(argv)
    root = tempfile.mkdtemp(prefix="bench-shards-")
    try:
        t = time.perf_counter()
        folder, pattern, n_pages, n_images = write_pages(root, args.images, args.size)
        print(f"wrote {n_images} images on {n_pages} pages as folders and {len(shards.expand(pattern))} shards "
              f"in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        pages, _ = data.open_pages(folder, args.image_size)
        batches = n_pages // args.batch                  # about one epoch of page pairs
        rows = []
        for name, loader in (
                ("folder", data.make_loader(data.PagePairs(pages, "page"), args.batch, 0, 1, 0, num_workers=args.workers)),
                ("stream", stream.StreamLoader(stream.ShardStream(pattern, args.image_size, "page"), args.batch,
                                               args.workers))):
            seconds, items = epoch_rate(loader, batches)
            rows.append({"loader": name, "pages_per_s": round(items / seconds, 1),
                         "images_per_s": round(2 * items / seconds, 1), "pairs": items, "seconds": round(seconds, 2)})
            print(json.dumps(rows[-1]))
        one = shards.expand(pattern)[0]
        for count in (10, 100, 1000):
            many = os.path.join(root, f"many{count}")
            os.makedirs(many)
            for i in range(count):
                os.link(one, os.path.join(many, f"{i:06d}.tar"))  # hard links: 1000 shard files, one shard's bytes
            shards.write_index(many, {f"{i:06d}.tar": shards.read_index([one])[0] for i in range(count)})
            seconds = first_batch(os.path.join(many, f"{{000000..{count - 1:06d}}}.tar"), args.image_size,
                                  args.batch, args.workers)
            print(json.dumps({"shards": count, "first_batch_s": round(seconds, 3)}))
        print(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "workers": args.workers,
                          "file_size": args.size, "image_size": args.image_size, "batch": args.batch}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
