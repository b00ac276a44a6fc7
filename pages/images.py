"""Robust image I/O and the one folder walk of the project (data.py, metrics.py, sample.py, semantica.py).

Not an equation of the paper, but what its pipeline needs to survive web images (§5 trains on images
from web pages): `find_images` is THE folder walk (recursive, follows symlinked folders once, each file
once, sorted); `load_image` turns any decodable file into float (3, S, S) in [-1, 1] (EXIF orientation,
alpha on white, 16-bit grayscale, CMYK, palette -> RGB; shorter side to S and centre crop); `image_batch` is
the one conversion of the Python API's images (PIL, numpy uint8 HWC, uint8 or [-1, 1] tensors); files are
refused before decoding when empty or over the decompression-bomb limit; `check_image` gives a skip
reason instead of raising, and `iter_images` logs and skips unreadable files. Writing: PNGs and grids
(atomic), and `folder_error`, the scripts' up-front check that an output folder can be made.
Left out: video/animation frames (the first frame of a GIF/TIFF is used), colour management (ICC
profiles are ignored), remote URLs (download first; see img2dataset).
"""
import contextlib
import io
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

log = logging.getLogger("semantica.images")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def find_images(root, extensions=IMAGE_EXTENSIONS):
    """THE folder walk of the project (metrics, scan) -> sorted list[Path] of files under `root` ending in
    `extensions` (any case; None = all). Recursive, follows symlinked folders (each real folder once, so
    loops end), each file once by resolved path; hidden names skipped (DESIGN). ValueError if none."""
    if not os.path.isdir(root):
        raise ValueError(f"{root}: not a folder")
    found, seen_dirs = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:                            # a symlink loop, or a folder linked twice
            dirnames.clear()
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath, f) for f in filenames
                  if not f.startswith(".") and (extensions is None or f.lower().endswith(extensions))]
    files, seen = [], set()
    for path, real in ((p, os.path.realpath(p)) for p in sorted(found)):
        if real not in seen and os.path.isfile(real):    # broken links are not files
            seen.add(real)
            files.append(path)
    if not files:
        raise ValueError(f"no images under {root}")
    return files


def pixel_limit(max_pixels=None):
    """Decompression-bomb limit read at CALL time: `max_pixels` if given, else Pillow's
    Image.MAX_IMAGE_PIXELS (~89.5 Mpx by default). None (or 0) = no limit."""
    return (Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels) or None


@contextlib.contextmanager
def open_checked(path, max_pixels=None):
    """Open lazily (header only); refuse empty files and images over pixel_limit(max_pixels) before
    decoding. `path`: a file path, or the encoded image's bytes (a tar member). Raises ValueError /
    OSError with the reason."""
    limit = pixel_limit(max_pixels)
    if (len(path) if isinstance(path, bytes) else os.path.getsize(path)) == 0:
        raise ValueError("empty file")
    # DESIGN: our check replaces Pillow's (which would refuse a larger explicit limit); restored on close.
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as im:
            if limit and im.width * im.height > limit:
                raise ValueError(f"decompression bomb: {im.width}x{im.height} > {limit} pixels "
                                 f"(raise --max-pixels / PIL.Image.MAX_IMAGE_PIXELS)")
            yield im
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def to_rgb(im):
    """Any decodable PIL image -> 8-bit RGB (EXIF orientation applied, alpha composited on white)."""
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I") or im.mode == "F":          # 16-bit / 32-bit grayscale -> 8 bit
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or a.max() > 255:  # 0..65535 -> 0..255 ("I"/"F" range is unknown)
            a = a / 257.0
        im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    return im.convert("RGB")                             # L, P, CMYK, YCbCr, ... -> RGB


def centre_crop_resize(im, size=None):
    """RGB PIL image -> float (3, size, size) in [-1, 1]: the centred min(w, h) square cut in SOURCE
    coordinates, then resized (bicubic, antialiased) = "shorter side to size, centre crop" up to
    interpolation, with O(size²) extra memory even for 1 x 3000 images. size=None: as it is, (3, h, w)."""
    if size is not None:
        w, h = im.size
        side = min(w, h)
        im = im.resize((size, size), Image.BICUBIC, box=((w - side) / 2, (h - side) / 2, (w + side) / 2,
                                                          (h + side) / 2))
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def image_batch(pictures, size=None, what="images"):
    """The Python API's images (Semantica.sample, metrics.extract_features) -> float32 (B, 3, H, W) in [-1, 1].

    pictures: one image, a batch, or a list of images, each
      - a PIL image of any mode (to_rgb: EXIF orientation, alpha on white, 16-bit gray, CMYK, palette);
      - a numpy uint8 array in HWC layout, 0..255: (H, W) gray, (H, W, 1 | 3 | 4) gray / RGB / RGBA,
        or a (B, H, W, C) batch; converted as the PIL image of that array;
      - a torch tensor (3, H, W) or (B, 3, H, W): uint8 in 0..255 (x / 127.5 - 1), or float in [-1, 1].
    size: PIL and numpy images are centre-cropped and resized to (size, size) (centre_crop_resize, as in
    training); tensors keep their size. All images must end up one size. Tensors stay on their device.
    Raises ValueError (one line, naming `what`) for any other type, dtype or layout (CHW numpy, HWC
    tensors), NaN/inf, float values outside [-1, 1], and float tensors with no value below 0, which is what
    [0, 1] images (torchvision's ToTensor) look like: pass x * 2 - 1, or uint8 (also for a [-1, 1] image
    that is truly brighter than mid-grey everywhere).
    """
    if isinstance(pictures, (np.ndarray, torch.Tensor)) and pictures.ndim == 4:
        pictures = list(pictures)
    elif not isinstance(pictures, (list, tuple)):
        pictures = [pictures]
    if not pictures:
        raise ValueError(f"{what}: no images given")
    rows = [_image_tensor(p, size, what) for p in pictures]
    shapes = sorted({tuple(r.shape) for r in rows})
    if len(shapes) > 1:
        raise ValueError(f"{what}: images of different sizes {shapes}: give one size (PIL and numpy images "
                         f"are resized to the model's)")
    x = torch.stack([r.to(rows[0].device) for r in rows])
    floats = [r for p, r in zip(pictures, rows) if torch.is_tensor(p) and p.is_floating_point()]
    if floats:
        lo, hi = min(r.min().item() for r in floats), max(r.max().item() for r in floats)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{what}: NaN/inf values in the image tensors")
        if lo < -1.001 or hi > 1.001:                   # DESIGN: float rounding slack, as inception.py's check
            raise ValueError(f"{what}: float tensors must be in [-1, 1], got values in [{lo:.3g}, {hi:.3g}] "
                             f"(0..255 floats: x / 127.5 - 1; or pass uint8)")
        if lo >= 0:
            raise ValueError(f"{what}: float tensors must be in [-1, 1]; these have no value below 0, as [0, 1] "
                             f"images do (torchvision ToTensor): pass x * 2 - 1 if they are [0, 1], or uint8 images "
                             f"(exact for 8-bit sources, and for [-1, 1] images that are truly all bright)")
    return x


def _image_tensor(p, size, what):
    """One image of image_batch's kinds -> float (3, H, W); uint8 and PIL/numpy in [-1, 1]."""
    if isinstance(p, np.ndarray):
        if p.dtype != np.uint8 or not (p.ndim == 2 or p.ndim == 3 and p.shape[2] in (1, 3, 4)):
            raise ValueError(f"{what}: numpy images must be uint8 HWC arrays, (H, W) or (H, W, 1|3|4) in 0..255, "
                             f"got {p.dtype} of shape {p.shape}")
        p = Image.fromarray(p[..., 0] if p.ndim == 3 and p.shape[2] == 1 else p)
    if isinstance(p, Image.Image):
        return centre_crop_resize(to_rgb(p), size)
    if not torch.is_tensor(p):
        raise ValueError(f"{what}: expected PIL images, numpy uint8 HWC arrays or torch tensors, got "
                         f"{type(p).__name__}")
    if p.ndim != 3 or p.shape[0] != 3:
        raise ValueError(f"{what}: tensors must be CHW, (3, H, W) or (B, 3, H, W), got shape {tuple(p.shape)}")
    if p.dtype == torch.uint8:
        return p.float() / 127.5 - 1.0
    if not p.is_floating_point():
        raise ValueError(f"{what}: tensors must be uint8 (0..255) or float ([-1, 1]), got {p.dtype}")
    return p.float()


def load_image(path, size=None, max_pixels=None):
    """One file -> float (3, size, size) in [-1, 1] (size=None: (3, h, w)); raises naming the reason."""
    with open_checked(path, max_pixels) as im:
        im.load()                                        # a truncated file raises here
        return centre_crop_resize(to_rgb(im), size)


def check_image(path, decode=False, max_pixels=None):
    """Cheap validity check for scanning: None if usable, else the reason a file is skipped."""
    try:
        with open_checked(path, max_pixels) as im:
            if decode:
                im.load()
                to_rgb(im)
            else:
                im.verify()                              # structure/CRC check without decoding pixels
    except Exception as e:                               # any decoder error is a skip reason, never a crash
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return None


def iter_images(paths, size=None, max_pixels=None):
    """Yield load_image(path, size) for each readable path on its own (never sized after another file);
    unreadable files are logged and skipped."""
    for path in paths:
        try:
            yield load_image(path, size, max_pixels)
        except Exception as e:
            log.warning("skipping %s: %s: %s", path, type(e).__name__, e)


# ----------------------------------------------------------------------------- writing images

def save_png(x, path):
    """(3, H, W) or (B, 3, H, W) float in [-1, 1] -> an 8-bit PNG at `path` (a batch becomes one row)."""
    x = x if x.dim() == 3 else torch.cat(list(x), dim=2)
    a = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(a).save(path)


def save_grid(rows, path):
    """rows (R, C, 3, H, W) in [-1, 1] -> one PNG (R rows x C columns, 2 px white gaps), written atomically
    (temporary file, then rename); returns the (H', W', 3) uint8 canvas (Fig. 1 layout: condition, variations)."""
    rows = ((rows.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    r, c, _, h, w = rows.shape
    canvas = np.full((r * (h + 2) + 2, c * (w + 2) + 2, 3), 255, np.uint8)
    for i in range(r):
        for j in range(c):
            canvas[2 + i * (h + 2):2 + i * (h + 2) + h, 2 + j * (w + 2):2 + j * (w + 2) + w] = \
                rows[i, j].permute(1, 2, 0).numpy()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(canvas).save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)
    return canvas


def folder_error(folder):
    """Why `folder` cannot be created (or written, when it exists) -> a reason, or None when it can. The missing
    folders are made to prove it (a path under /proc, a read-only mount, a file on the way all fail here, before
    any work) and removed again: a run refused later, for its data say, leaves no empty folder behind. Callers
    create the folder when they first write into it."""
    folder, made = os.path.abspath(folder), []
    parent = folder
    while not os.path.exists(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a folder"
    if not os.access(parent, os.W_OK):
        return f"cannot write under {parent}"
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        return f"cannot create {folder} ({e.strerror})"
    finally:
        for d in made:                                   # deepest first; another process may have filled one
            with contextlib.suppress(OSError):
                os.rmdir(d)
    return None
