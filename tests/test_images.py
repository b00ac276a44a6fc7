"""Tests for images.py: the one folder walk (links, loops, duplicates), robust decoding (modes, EXIF, alpha,
16-bit), the decompression-bomb limit, the centre crop against a closed form and the usual resize-then-crop,
memory on thin images, iter_images' per-file sizing, and image_batch's conversion of the Python API's images
(each kind by its range) and one-line refusals. Expected values come from closed forms or
hand-built references, never from the code under test."""
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from pages import images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png(path, size=(8, 8), value=128):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, (value,) * 3).save(path)


def test_find_images_follows_links_once_sorted(tmp_path):
    root, other = tmp_path / "root", tmp_path / "elsewhere"
    _png(root / "a.png")
    for i in range(5):
        _png(other / f"{i}.JPG" if i == 4 else other / f"{i}.png")
    (other / "notes.txt").write_text("not an image")
    (other / ".hidden.png").write_bytes(b"")
    os.symlink(other, root / "linked")                    # a symlinked sub-folder of 5 images
    os.symlink(other, root / "linked-again")              # the same folder twice: its files count once
    os.symlink(root, other / "loop")                      # a loop back to the root
    os.symlink(other / "0.png", root / "z.png")           # a link to a file already found
    got = images.find_images(root)
    want = [root / "a.png"] + [root / "linked" / f for f in ("0.png", "1.png", "2.png", "3.png", "4.JPG")]
    assert got == want
    assert len({os.path.realpath(p) for p in got}) == len(got)
    assert len(images.find_images(root, extensions=None)) == 7            # + notes.txt
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images under"):
        images.find_images(tmp_path / "empty")


def test_pillow_pixel_limit_read_at_call_time(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    Image.new("RGB", (64, 64), "red").save(path)                        # 4096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)                # Pillow's documented "no limit"
    assert images.load_image(path, 8).shape == (3, 8, 8)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)                # set after `import images`: honoured
    with pytest.raises(ValueError, match="decompression bomb"):
        images.load_image(path, 8)
    assert "decompression bomb" in images.check_image(path)
    assert images.load_image(path, 8, max_pixels=4096).shape == (3, 8, 8)  # explicit limit wins, even > 2x Pillow's
    assert images.check_image(path, max_pixels=0) is None                  # 0 = no limit
    with pytest.raises(ValueError, match="decompression bomb"):
        images.load_image(path, 8, max_pixels=4095)
    assert Image.MAX_IMAGE_PIXELS == 1000                                # Pillow's setting left as it was


def _load(tmp_path, im, fmt="PNG", **save_kw):
    path = str(tmp_path / f"img.{fmt.lower()}")
    im.save(path, fmt, **save_kw)
    assert images.check_image(path) is None
    return images.load_image(path, 8)


def test_decodable_modes_become_rgb(tmp_path):
    for mode in ("L", "P", "CMYK", "RGB"):
        x = _load(tmp_path, Image.new(mode, (12, 10), 100), "JPEG" if mode == "CMYK" else "PNG")
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))                 # fully transparent red
    assert torch.allclose(_load(tmp_path, rgba), torch.ones(3, 8, 8))  # composited on white
    deep = Image.fromarray(np.full((10, 10), 65535, np.uint16))       # 16-bit white
    assert deep.mode.startswith("I")
    assert torch.allclose(_load(tmp_path, deep), torch.ones(3, 8, 8))
    # EXIF orientation 6 (rotate 90 degrees clockwise to display): left half red -> top half red
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20, 0], a[:, 20:, 2] = 255, 255
    exif = Image.Exif()
    exif[0x0112] = 6
    x = _load(tmp_path, Image.fromarray(a), "JPEG", exif=exif, quality=95)
    assert x[0, 0].mean() > 0.8 and x[2, 0].mean() < -0.8 and x[2, -1].mean() > 0.8


def test_centre_crop_is_the_centred_square(tmp_path):
    """Closed form: at scale 1 the crop is the exact centred square; otherwise it matches the usual
    resize-shorter-side-then-crop (reference below) within interpolation tolerance."""
    a = np.random.default_rng(0).integers(0, 256, (100, 200, 3), dtype=np.uint8)   # h=100, w=200
    Image.fromarray(a).save(tmp_path / "wide.png")
    Image.fromarray(a.transpose(1, 0, 2).copy()).save(tmp_path / "tall.png")
    want = torch.from_numpy(a[:, 50:150]).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(images.load_image(tmp_path / "wide.png", 100), want, atol=1e-6)
    assert torch.allclose(images.load_image(tmp_path / "tall.png", 100), want.transpose(1, 2), atol=1e-6)

    def resize_then_crop(im, size):                                    # the usual definition
        w, h = im.size
        w2, h2 = max(size, round(w * size / min(w, h))), max(size, round(h * size / min(w, h)))
        im = im.resize((w2, h2), Image.BICUBIC)
        left, top = (w2 - size) // 2, (h2 - size) // 2
        return np.asarray(im.crop((left, top, left + size, top + size)), np.float32) / 127.5 - 1

    y, x = np.mgrid[0:200, 0:300] / 40.0
    smooth = np.stack([np.sin(x) * np.cos(y), np.cos(x + y), np.sin(0.5 * x - y)], -1) * 120 + 128
    Image.fromarray(smooth.astype(np.uint8)).save(tmp_path / "smooth.png")
    got = images.load_image(tmp_path / "smooth.png", 64).permute(1, 2, 0).numpy()
    ref = resize_then_crop(Image.open(tmp_path / "smooth.png").convert("RGB"), 64)
    assert np.abs(got - ref).mean() < 0.02 and np.abs(got - ref).max() < 0.15


def test_thin_image_memory_stays_small(tmp_path):
    """A 1 x 3000 palette GIF at 512 px costs O(512²) extra memory (peak RSS of a fresh
    process; resize-then-crop would allocate a 512 x 1.5M image, ~2.3 GB)."""
    Image.new("P", (1, 3000), 7).save(tmp_path / "thin.gif")
    Image.new("RGB", (40, 30), "red").save(tmp_path / "warm.png")
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {ROOT!r})
        from pages import images
        images.load_image({str(tmp_path / 'warm.png')!r}, 512)           # allocate the output once
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        x = images.load_image({str(tmp_path / 'thin.gif')!r}, 512)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(tuple(x.shape), (after - before) / 1024)                 # Linux: KiB -> MiB
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    shape, extra_mib = out.stdout.rsplit(")", 1)
    assert shape + ")" == "(3, 512, 512)" and float(extra_mib) < 50


def test_iter_images_each_image_on_its_own(tmp_path, caplog):
    """A file's tensor does not depend on the other files (a 16 px thumbnail sorting first)."""
    a = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "b.png")
    Image.new("RGB", (16, 16), "blue").save(tmp_path / "a_thumb.png")
    (tmp_path / "c.png").write_bytes(b"junk")
    alone = list(images.iter_images([tmp_path / "b.png"]))
    with caplog.at_level(logging.WARNING):
        together = list(images.iter_images(images.find_images(tmp_path)))
    assert [tuple(x.shape) for x in together] == [(3, 16, 16), (3, 48, 64)] and "c.png" in caplog.text
    assert torch.equal(together[1], alone[0])
    assert torch.equal(alone[0], torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1)  # native pixels
    sized = list(images.iter_images([tmp_path / "a_thumb.png", tmp_path / "b.png"], size=32))
    assert torch.equal(sized[1], images.load_image(tmp_path / "b.png", 32))


def test_image_batch_converts_each_kind_by_its_range():
    """The Python API's images -> float (B, 3, H, W) in [-1, 1], against hand-computed values: numpy uint8 HWC
    (RGB, gray (H, W) and (H, W, 1), RGBA composited on white: c a / 255 + 255 (1 - a / 255)), uint8 CHW
    tensors (x / 127.5 - 1), [-1, 1] floats as given; `size` crops and resizes PIL / numpy images only."""
    rgba = np.array([[[255, 0, 0, 255], [0, 0, 0, 0]], [[0, 255, 0, 128], [10, 20, 30, 255]]], np.uint8)
    a = rgba[..., 3:].astype(np.float64) / 255
    on_white = torch.from_numpy((rgba[..., :3] * a + 255 * (1 - a)) / 127.5 - 1).permute(2, 0, 1).float()
    assert torch.allclose(images.image_batch(rgba)[0], on_white, atol=1.01 / 127.5)   # one 8-bit level
    assert torch.equal(images.image_batch(Image.fromarray(rgba))[0], images.image_batch(rgba)[0])
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    want = torch.from_numpy(gray / 127.5 - 1).float().expand(3, -1, -1)
    for given in (gray, gray[..., None], Image.fromarray(gray)):
        assert torch.allclose(images.image_batch(given), want[None], atol=1e-6)
    rgb = np.random.default_rng(0).integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)    # a (B, H, W, C) batch
    hand = torch.from_numpy(rgb.astype(np.float64) / 127.5 - 1).permute(0, 3, 1, 2).float()
    for given in (rgb, list(rgb), torch.from_numpy(rgb).permute(0, 3, 1, 2), hand, list(hand)):
        got = images.image_batch(given)
        assert got.dtype == torch.float32 and torch.allclose(got, hand, atol=1e-6)
    cut = torch.from_numpy(np.ascontiguousarray(rgb[0, :4, 1:5]) / 127.5 - 1).permute(2, 0, 1).float()
    assert torch.allclose(images.image_batch(np.ascontiguousarray(rgb[0, :4]), size=4)[0], cut, atol=1e-6)  # (4, 6)
    assert images.image_batch(hand, size=2).shape == (2, 3, 5, 6)                       # tensors keep their size
    bright = torch.full((1, 3, 4, 4), 250, dtype=torch.uint8)    # an all-bright image: given as uint8, accepted
    assert torch.allclose(images.image_batch(bright), torch.full((1, 3, 4, 4), 250 / 127.5 - 1), atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    (torch.rand(2, 3, 4, 4), "no value below 0, as \\[0, 1\\] images"),           # torchvision ToTensor output
    (torch.rand(2, 3, 4, 4) * 255, "must be in \\[-1, 1\\], got values in"),
    (torch.full((3, 4, 4), float("inf")), "NaN/inf"),
    (np.zeros((4, 4, 3), np.float32), "uint8 HWC"), (np.zeros((3, 4, 5), np.uint8), "uint8 HWC"),
    (torch.zeros(4, 4, 3), "CHW"), (torch.zeros(1, 4, 4), "CHW"), (torch.zeros(3, 4, 4, dtype=torch.int64), "int64"),
    ([torch.zeros(3, 4, 4) - 1, torch.zeros(3, 5, 4) - 1], "different sizes"), ([], "no images"),
    ("a.png", "got str"), ([None], "got NoneType")])
def test_image_batch_refuses_in_one_line(bad, message):
    with pytest.raises(ValueError, match=message) as e:
        images.image_batch(bad)
    assert str(e.value).startswith("images: ") and "\n" not in str(e.value)
