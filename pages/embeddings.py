"""Frozen-encoder passes (Semantica §5, §3.2): the filter's global embeddings and the precomputed conditioning.

The encoder is frozen (§3.2), so its outputs are a function of the image alone and can be computed once:
- `filter_embeddings`: THE §5 filter embedding (cosine of condition and target, App. C): the global
  embedding of the image loaded once at filter_size (the encoder's official eval transform, one resize from
  the source) and stored as float16. The folder pass (`cached_embeddings`, cached by a hash of the encoder
  weights and the files), the conditioning cache and the shard pass (shard_filter.py) all compute this.
- `encode_cache` / `CondCache`: every image's tokens (N, T, D) float16 and global (N, D) float32 at the
  training size (`python data.py encode`, one process or torchrun ranks), read back by data.PagePairs
  (cross-attention tokens or the FiLM global vector, §3.4) instead of running the encoder each step, and
  the filter embedding (N, E) float16 (`filter`), so a run on the cache filters as a run without it.
`pages` is any object with len(), .count(p), .image(p, i, size), .key(p, i), .fingerprint() and
.image_size (data.FilePages, synthetic.SyntheticPages); `encoder` follows encoders.py (.name,
.image_size, .weights, .preprocess, forward -> (global, tokens)). Neither is imported here.
Rows are images in page order: row g = image i of page p with g = sum(count(q) for q < p) + i.
Left out: sharded (tar) caches, multi-image conditioning.
"""
import hashlib
import json
import logging
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

log = logging.getLogger("semantica.embeddings")


def encoder_fingerprint(encoder):
    """Name, input size and a cheap hash of the weights (first values of every tensor) -> hex str."""
    h = hashlib.sha1(f"{encoder.name}|{encoder.image_size}".encode())
    for name, t in encoder.state_dict().items():
        h.update(name.encode() + t.flatten()[:1024].float().cpu().numpy().tobytes())
    return h.hexdigest()


def filter_size(encoder):
    """The side the §5 filter loads images at: the short side the encoder's official eval transform resizes
    to (DINOv2 / MAE: Resize(256) before CenterCrop(224); CLIP, SigLIP: their input size), so that
    encoder.preprocess only crops: one resize from the source image, as upstream. INTERPRETATION: §5 says
    only "the global CLS representation"; the filter is a property of the data, so it does not follow the
    training size. Encoders without a crop ratio (test doubles) take their input size."""
    return round(encoder.image_size / getattr(getattr(encoder, "config", None), "crop_ratio", 1.0))


@torch.no_grad()
def encode_images(pages, fn, size, indices=None, batch_size=64, device="cpu", desc="encoding"):
    """Yield (flat indices (b,), valid (b,), [fn(images (b, 3, size, size)) outputs as numpy]) over
    `indices` (page order; default all) with a tqdm bar; unloadable images: zeros, marked invalid."""
    items = [(p, i) for p in range(len(pages)) for i in range(pages.count(p))]
    indices = np.arange(len(items)) if indices is None else np.asarray(indices)
    bar = tqdm(total=len(indices), desc=desc, unit="img", file=sys.stderr, mininterval=1 if sys.stderr.isatty() else 30)
    for s in range(0, len(indices), batch_size):
        idx, imgs = indices[s:s + batch_size], []
        valid = np.ones(len(idx), bool)
        for k, g in enumerate(idx):
            try:
                imgs.append(pages.image(*items[g], size))
            except Exception as e:
                log.warning("skipping %s: %s: %s", pages.key(*items[g]), type(e).__name__, e)
                imgs.append(torch.zeros(3, size, size))
                valid[k] = False
        yield idx, valid, [y.float().cpu().numpy() for y in fn(torch.stack(imgs).to(device))]
        bar.update(len(idx))
    bar.close()


def filter_embeddings(pages, encoder, batch_size=64, device=None, desc=None):
    """§5 filter embeddings (App. C) -> (global (N, E) float16, valid (N,) bool) of every image of `pages`,
    each loaded at filter_size(encoder) and passed through encoder.preprocess (rows in page order).
    DESIGN: float16 is part of the definition (what the caches and shards store; cosines are float64 of
    these), so every path compares the same numbers and keeps the same pairs."""
    n = sum(pages.count(p) for p in range(len(pages)))
    emb, valid = np.zeros((n, 0), np.float16), np.zeros(n, bool)
    for idx, ok, (g,) in encode_images(pages, lambda x: encoder(encoder.preprocess(x))[:1], filter_size(encoder),
                                       batch_size=batch_size, device=device or next(encoder.parameters()).device,
                                       desc=desc or f"filter embeddings [{encoder.name}]"):
        emb = np.zeros((n, g.shape[1]), np.float16) if emb.shape[1] == 0 else emb
        emb[idx], valid[idx] = g, ok
    return emb, valid


def cached_embeddings(pages, encoder, cache_dir, batch_size=64):
    """filter_embeddings as torch tensors, cached atomically under `cache_dir` by a hash of the encoder, the
    filter size and the files (sizes, mtimes)."""
    key = f"{encoder_fingerprint(encoder)}|{filter_size(encoder)}|{pages.fingerprint()}"
    path = os.path.join(cache_dir, f"emb-{encoder.name}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz")
    if not os.path.exists(path):
        emb, valid = filter_embeddings(pages, encoder, batch_size)
        os.makedirs(cache_dir, exist_ok=True)
        np.savez(path + ".tmp.npz", emb=emb, valid=valid)
        os.replace(path + ".tmp.npz", path)
    z = np.load(path)
    return torch.from_numpy(z["emb"]), torch.from_numpy(z["valid"])


def encode_cache(pages, encoder, out, rank=0, world=1, batch_size=64, barrier=lambda: None):
    """§3.2: every image's frozen-encoder tokens (N, T, D) float16 and global (N, D) float32, once, into
    folder `out` (tokens/global/valid.npy; row g = image (page, index) in page order), and the §5 filter
    embedding (N, E) float16 (filter.npy: filter_embeddings' definition; the global pass itself when the
    training size is filter_size). Images at pages.image_size (training size) go through
    encoder.preprocess, as Semantica.condition does. Rank r of `world` fills rows r, r+W, ... of the shared
    files (one machine or shared file system); rank 0 writes meta.json (encoder and pages fingerprints)
    LAST, so an interrupted pass leaves no cache."""
    n, device = sum(pages.count(p) for p in range(len(pages))), next(encoder.parameters()).device
    fn = lambda x: encoder(encoder.preprocess(x))      # noqa: E731  -> (global (B, D), tokens (B, T, D))
    g, tok = fn(torch.zeros(1, 3, pages.image_size, pages.image_size, device=device))   # shapes only
    files = {"tokens": (np.float16, (n, *tok.shape[1:])), "global": (np.float32, (n, *g.shape[1:])),
             "filter": (np.float16, (n, *g.shape[1:])), "valid": (bool, (n,))}
    same = pages.image_size == filter_size(encoder)
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        if os.path.exists(os.path.join(out, "meta.json")):
            os.remove(os.path.join(out, "meta.json"))
        for name, (dtype, shape) in files.items():
            np.lib.format.open_memmap(os.path.join(out, f"{name}.npy"), "w+", dtype, shape).flush()
    barrier()
    arr = {name: np.load(os.path.join(out, f"{name}.npy"), mmap_mode="r+") for name in files}
    for idx, ok, (g, tok) in encode_images(pages, fn, pages.image_size, range(rank, n, world), batch_size, device,
                                           desc=f"encode [{encoder.name}] rank {rank}/{world}"):
        arr["tokens"][idx], arr["global"][idx], arr["valid"][idx] = tok, g, ok
        if same:
            arr["filter"][idx] = g
    if not same:                                         # the filter's images are at another size: a second pass
        desc = f"filter embeddings [{encoder.name}] rank {rank}/{world}"
        for idx, ok, (g,) in encode_images(pages, lambda x: fn(x)[:1], filter_size(encoder), range(rank, n, world),
                                           batch_size, device, desc):
            arr["filter"][idx], arr["valid"][idx] = g, arr["valid"][idx] & ok
    for a in arr.values():
        a.flush()
    barrier()
    if rank == 0:
        meta = {"format": "semantica-cond-cache/2", "encoder": encoder.name, "weights": encoder.weights,
                "encoder_fingerprint": encoder_fingerprint(encoder), "image_size": pages.image_size,
                "pages_fingerprint": pages.fingerprint(), "counts": [pages.count(p) for p in range(len(pages))],
                "tokens_shape": list(tok.shape[1:])}
        with open(os.path.join(out, "meta.json.tmp"), "w") as f:
            json.dump(meta, f)
        os.replace(os.path.join(out, "meta.json.tmp"), os.path.join(out, "meta.json"))
    return out


def encode_cache_torchrun(pages, encoder, out, batch_size=64):
    """encode_cache alone or under torchrun (RANK, WORLD_SIZE; a gloo process group for the barrier; each
    rank's encoder on its own GPU, LOCAL_RANK, when there are GPUs) -> this process's rank."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("gloo")
    if torch.cuda.is_available():
        encoder.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    encode_cache(pages, encoder, out, rank, world, batch_size, dist.barrier if world > 1 else lambda: None)
    if world > 1:
        dist.destroy_process_group()
    return rank


class CondCache:
    """An encode_cache folder, memory-mapped lazily in each process; ValueError if incomplete."""

    def __init__(self, path):
        if not os.path.exists(os.path.join(path, "meta.json")):
            raise ValueError(f"{path}: no complete conditioning cache (no meta.json); run `python data.py encode`")
        with open(os.path.join(path, "meta.json")) as f:
            self.path, self.meta, self._arrays = str(path), json.load(f), None
        self.offsets = np.cumsum([0] + self.meta["counts"])

    @classmethod
    def open(cls, cache, pages=None, encoder=None):
        """A CondCache or an encode_cache folder -> CondCache, checked against `pages` / `encoder` (check)."""
        return (cache if isinstance(cache, cls) else cls(cache)).check(pages, encoder)

    def check(self, pages=None, encoder=None):
        """Refuse (ValueError, naming both) a cache made from other files, size or encoder weights."""
        m = self.meta
        if pages is not None and ([pages.count(p) for p in range(len(pages))] != m["counts"] or
                                  pages.image_size != m["image_size"] or pages.fingerprint() != m["pages_fingerprint"]):
            raise ValueError(f"{self.path}: conditioning cache was made from other images or size "
                             f"({m['image_size']} px) than these pages ({pages.image_size} px); re-run data.py encode")
        if encoder is not None and encoder_fingerprint(encoder) != m["encoder_fingerprint"]:
            raise ValueError(f"{self.path}: conditioning cache was made by encoder {m['encoder']} "
                             f"(weights {m['weights']}), not by {encoder.name} (weights {encoder.weights})")
        return self

    def __getstate__(self):                              # workers re-map the files instead of copying them
        return {**self.__dict__, "_arrays": None}

    def arrays(self):
        if self._arrays is None:
            self._arrays = {k: np.load(os.path.join(self.path, f"{k}.npy"), mmap_mode="r")
                            for k in ("tokens", "global", "valid")}
        return self._arrays

    def filter_embeddings(self):
        """The cached §5 filter embeddings -> (global (N, E) float16, valid (N,)) tensors, as filter_embeddings
        gives; ValueError for a cache written without them (an older data.py encode)."""
        path = os.path.join(self.path, "filter.npy")
        if not os.path.exists(path):
            raise ValueError(f"{self.path}: conditioning cache without the §5 filter embeddings (an older data.py "
                             "encode); re-run data.py encode")
        return torch.from_numpy(np.load(path)), torch.from_numpy(np.array(self.arrays()["valid"]))

    def get(self, page, index, kind="tokens"):
        """Cached tokens (T, D) or global (D,) of image `index` of `page`, float32; ValueError if it
        failed to encode."""
        g = int(self.offsets[page] + index)
        if not self.arrays()["valid"][g]:
            raise ValueError("no cached conditioning (the image failed to encode)")
        return torch.from_numpy(np.array(self.arrays()[kind][g], dtype=np.float32))

