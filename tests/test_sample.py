"""sample.py: argument and output checks before any work, grids with labels and saved samples, the K-shot
plan really run (§7), alignment against each sample's own conditioning image (§8.2), --batch bounding
every call, and identical results for any --batch, any number of processes and a resumed run (of the same
weights only). Reports say when their networks are not the paper's; a closed output pipe loses nothing;
--deterministic sets PyTorch's reproducibility flags.

Most tests use StubModel, a copying "model" (§7's toy example: each sample is its conditioning image,
plus optional noise drawn from (seed, sample index, w) as Semantica.sample's contract says), whose
answers are known in closed form: with exact copies recall is (#conditioning images)/N, precision 1,
and alignment 1. Tests of the real Semantica checkpoint path run once semantica.save_checkpoint lands.
"""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import encoders
from machinery import flags, sample_runs
import sample
import semantica
import uvit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16


class StubEncoder(torch.nn.Module):
    """Global embedding = 2x2 average pooling (12-d): per row, independent of the batch."""
    name, weights, seed, dim = "stub-pool", None, 0, 12

    def preprocess(self, images):
        return images

    def forward(self, images):
        g = torch.nn.functional.adaptive_avg_pool2d(images.float(), 2).flatten(1)
        return g, g[:, None]


class StubModel:
    """Semantica.sample's interface: sample j of row r = cond_r + noise * eps + shift * guidance, eps from
    (seed, first_index + r, first_sample + j) alone (the contract). Records every call (conditioning images, first_index, first_sample, num_samples)."""

    def __init__(self, noise=0.0, shift=0.0):
        self.config, self.encoder, self.checkpoint_step = SimpleNamespace(image_size=SIZE), StubEncoder(), 7
        self.noise, self.shift, self.calls, self.guidance = noise, shift, [], set()

    def sample(self, cond_images, num_samples=1, steps=256, guidance=0.5, gamma=0.2, seed=0, cond=None,
               progress=False, first_index=0, first_sample=0):
        self.calls.append((cond_images.clone(), first_index, first_sample, num_samples))
        self.guidance.add(guidance)
        out = []
        for r, c in enumerate(cond_images):
            for s in range(num_samples):
                key = [seed, first_index + r, first_sample + s]
                g = torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))
                out.append((c + self.noise * torch.randn(c.shape, generator=g) + self.shift * guidance).clamp(-1, 1))
        return torch.stack(out).view(len(cond_images), num_samples, *cond_images.shape[1:])

    def state_dict(self):                     # its "weights", fingerprinted in OUT/run.json
        return {"noise": torch.tensor(self.noise), "shift": torch.tensor(self.shift)}


def write_pages(root, counts, seed=0):
    """root/page{p}/{i}.png: distinct random-noise images, counts[p] per page."""
    rng = np.random.default_rng(seed)
    for p, n in enumerate(counts):
        os.makedirs(root / f"page{p}", exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / f"page{p}" / f"{i}.png")
    return root


def run(argv, model):
    """sample.main with `model` instead of a checkpoint."""
    cfg = sample.parse_args(["--ckpt", "stub.pt", *argv])
    orig = sample.load_model
    sample.load_model = lambda cfg, device: model
    try:
        sample.main(cfg)
    finally:
        sample.load_model = orig
    return cfg


def cli(*args, **kw):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, **kw)


def user_error(proc, text):
    """One message naming the problem, exit 2, no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and text in proc.stderr.strip().splitlines()[-1], proc.stderr


# --------------------------------------------------------------------------------- errors first
@pytest.mark.parametrize("flags, text", [
    (["--steps", "0"], "--steps"), (["--n", "0"], "--n"), (["--guidance", "nan"], "--guidance"),
    (["--guidance", "0.5,inf"], "--guidance"), (["--gamma", "1.5"], "--gamma"), (["--gamma", "nan"], "--gamma"),
    (["--batch", "0"], "--batch"), (["--steps", "2.5"], "--steps"), (["--guidance", "half"], "--guidance"),
    (["--few-shot", "0"], "--few-shot")])
def test_bad_numbers_are_parse_errors(flags, text, capsys):
    with pytest.raises(SystemExit) as e:      # the checkpoint does not exist: the error must come first
        sample.parse_args(["--ckpt", "missing.pt", "--images", "a.png", *flags])
    assert e.value.code == 2 and text in capsys.readouterr().err


def test_bad_out_is_refused_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    for out, text in [(tmp_path, "is a folder"), (tmp_path / "grid.pdfx", "unknown image extension"),
                      (a_file / "grid.png", "is a file, not a folder"),
                      ("/proc/no-such-dir/grid.png", "cannot create"),   # writable-looking, cannot mkdir
                      ("/proc/grid.png", "cannot create")]:              # its samples' folder /proc/grid cannot be made
        with pytest.raises(SystemExit) as e:
            sample.parse_args(["--ckpt", "missing.pt", "--images", "a.png", "--out", str(out)])
        assert e.value.code == 2 and text in capsys.readouterr().err
    with pytest.raises(SystemExit):           # random feature / alignment networks: meaningless numbers
        sample.parse_args(["--ckpt", "m.pt", "--few-shot", "1", "--data", "d", "--features", "dinov2-l14"])
    assert "--feature-weights" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample.parse_args(["--ckpt", "m.pt", "--few-shot", "1", "--data", "d", "--alignment", "clip-b16"])
    assert "clip-b16=PATH" in capsys.readouterr().err
    with pytest.raises(SystemExit):           # --few-shot writes a folder: a file is refused
        sample.parse_args(["--ckpt", "m.pt", "--few-shot", "1", "--data", "d", "--out", str(a_file)])
    assert "is a file" in capsys.readouterr().err
    for out in (tmp_path / "new" / "grid.png", tmp_path / "new2" / "eval"):   # checked, not made: nothing left behind
        sample.parse_args(["--ckpt", "m.pt", "--images", "a.png", "--out", str(out)] if out.suffix else
                          ["--ckpt", "m.pt", "--few-shot", "1", "--data", "d", "--out", str(out)])
    assert not (tmp_path / "new").exists() and not (tmp_path / "new2").exists()


def test_help_comes_from_the_config_comments(capsys):
    with pytest.raises(SystemExit) as e:
        sample.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and "--device" in text
    for comment in flags.comments(sample.SampleConfig, sample.__file__).values():   # every field's comment, as written
        assert " ".join(comment.split())[:40] in text


def test_cli_user_errors_are_one_line(tmp_path):
    """Through the real CLI: a parse error, a missing checkpoint (the other errors go through the same
    fail() in process, below)."""
    user_error(cli("--ckpt", "missing.pt", "--images", "a.png", "--steps", "0"), "--steps")
    user_error(cli("--ckpt", str(tmp_path / "none.pt"), "--images", "a.png", "--out", str(tmp_path / "g.png")),
               "none.pt")


def test_unknown_data_source_and_unreadable_image_are_user_errors(tmp_path, capsys):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(SystemExit) as e:
        run(["--few-shot", "1", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")], StubModel())
    assert e.value.code == 2 and str(tmp_path / "empty") in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run(["--few-shot", "1", "--data", "no-such-source", "--out", str(tmp_path / "o")], StubModel())
    assert e.value.code == 2 and "no-such-source" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()                # refused: no empty --out folder left behind
    with pytest.raises(SystemExit) as e:
        run(["--images", str(tmp_path / "missing.png"), "--out", str(tmp_path / "g.png")], StubModel())
    assert e.value.code == 2 and "cannot read conditioning image" in capsys.readouterr().err


def test_kshot_groups_too_small_name_the_page_before_sampling(tmp_path, capsys):
    pages = write_pages(tmp_path / "d", [4, 2, 4])
    model = StubModel()
    with pytest.raises(SystemExit) as e:
        run(["--few-shot", "3", "--data", str(pages), "--out", str(tmp_path / "o")], model)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "page1 (2)" in err and "--few-shot" in err and "to 2" in err and not model.calls
    with pytest.raises(SystemExit):           # --per-group 3 with a 2-image page
        run(["--few-shot", "1", "--per-group", "3", "--data", str(pages), "--out", str(tmp_path / "o")], model)
    assert "page1 (2)" in capsys.readouterr().err
    few = write_pages(tmp_path / "few", [3])   # 3 < k + 1 = 4 test images: refused before sampling
    with pytest.raises(SystemExit):
        run(["--few-shot", "1", "--data", str(few), "--out", str(tmp_path / "o2")], model)
    assert "at least 4" in capsys.readouterr().err and not model.calls


# ------------------------------------------------------------------------------------------- grid
def test_grid_has_guidance_header_and_the_saved_samples_are_its_cells(tmp_path):
    pages = write_pages(tmp_path / "d", [3])
    images = [str(pages / "page0" / f"{i}.png") for i in range(3)]
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    run(["--images", *images, "--n", "2", "--guidance", "0,0.5", "--batch", "1", "--out", str(a)], StubModel(0.3))
    shifted = tmp_path / "s.png"             # each w's block holds that w's samples: shift * w apart, same noise
    run(["--images", *images, "--n", "2", "--guidance", "0,0.5", "--out", str(shifted)], StubModel(0.3, shift=0.2))
    for i in range(3):
        x0, x1 = (np.asarray(Image.open(tmp_path / "s" / f"img{i}_w{w}_s1.png")).astype(int) for w in (0.0, 0.5))
        inside = (x0 > 0) & (x0 < 242)           # not clamped in either
        assert inside.mean() > 0.5 and np.abs(x1 - x0 - 12.75)[inside].max() <= 1   # 0.1 * 127.5 = 12.75 levels
    model = StubModel(0.3)
    run(["--images", *images, "--n", "2", "--guidance", "0", "0.5", "--batch", "4", "--out", str(b)], model)
    assert max(len(c) * n for c, _, _, n in model.calls) <= 4 and model.guidance == {0.0, 0.5}
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))   # --batch does not matter
    grid = np.asarray(Image.open(b)).astype(int)
    cell = SIZE + 2
    head = grid.shape[0] - 3 * cell - 2
    assert grid.shape[1] == (1 + 2 * 2) * cell + 2 and head > 5
    for k in range(2):                        # each guidance block has dark label pixels above it
        assert (grid[:head, 2 + (1 + 2 * k) * cell:2 + (3 + 2 * k) * cell] < 128).any()
    for i in range(3):
        top = head + i * cell
        assert np.array_equal(grid[top:top + SIZE, 2:2 + SIZE], np.asarray(Image.open(images[i]).convert("RGB")))
        for k, w in enumerate((0.0, 0.5)):
            for j in range(2):
                x0 = 2 + (1 + 2 * k + j) * cell
                saved = np.asarray(Image.open(tmp_path / "b" / f"img{i}_w{w}_s{j}.png"))
                assert np.array_equal(grid[top:top + SIZE, x0:x0 + SIZE], saved)
    w0 = np.asarray(Image.open(tmp_path / "b" / "img0_w0.0_s0.png")).astype(int)
    w1 = np.asarray(Image.open(tmp_path / "b" / "img0_w0.0_s1.png")).astype(int)
    assert np.abs(w0 - w1).max() > 0         # the two samples of one image differ


# ------------------------------------------------------------------------------------ K-shot plan
@pytest.mark.filterwarnings("ignore:FID with")
def test_kshot_runs_the_kshot_plan_and_aligns_each_sample_with_its_own_condition(tmp_path):
    """4 pages x 8 images, K = 2 and a copying model: 8 conditioning images (2 per page), 4 samples each.
    §7's toy argument in closed form: precision 1, recall 8 / 32 (the full-set plan would give 1),
    alignment 1 (a wrong pairing of samples and conditions gives less)."""
    pages = write_pages(tmp_path / "d", [8, 8, 8, 8])
    model = StubModel()
    run(["--few-shot", "2", "--data", str(pages), "--guidance", "0.5", "--batch", "3", "--steps", "1",
         "--out", str(tmp_path / "o")], model)
    used = {}
    for cond, _, _, n in model.calls:
        assert len(cond) * n <= 3             # --batch bounds every call
        for c in cond:
            used[c.numpy().tobytes()] = used.get(c.numpy().tobytes(), 0) + n
    files = {}
    for p in range(4):
        for i in range(8):
            x = torch.from_numpy(np.asarray(Image.open(pages / f"page{p}" / f"{i}.png"), np.float32))
            files[(x.permute(2, 0, 1) / 127.5 - 1).numpy().tobytes()] = p
    assert model.guidance == {0.5}
    assert sorted(used.values()) == [4] * 8                       # 8 conditioning images, N / K = 4 samples each
    assert sorted(files[c] for c in used) == [0, 0, 1, 1, 2, 2, 3, 3]  # K = 2 per page
    r = json.loads((tmp_path / "o" / "kshot.json").read_text())["results"]["0.5"]
    assert r["n"] == 32 and r["precision"] == 1.0 and r["recall"] == 8 / 32
    (label, a), = r["alignment"].items()
    assert "stub-pool" in label and abs(a - 1.0) < 1e-6
    table = (tmp_path / "o" / "kshot.md").read_text()
    assert "stub-pool" in table and "alignment 1" in table


@pytest.mark.filterwarnings("ignore:FID with")
def test_alignment_one_column_per_named_space(tmp_path):
    """--alignment encoder,tiny=PATH: two columns; the tiny-space value equals the mean cosine, computed
    here from the sample files and the test images, of each sample with its own conditioning image (§8.2)."""
    weights = tmp_path / "enc.pth"
    encoders.save_dinov2(encoders.load_encoder("tiny", seed=5), weights)
    pages = write_pages(tmp_path / "d", [5, 6, 4])
    run(["--few-shot", "1", "--data", str(pages), "--guidance", "0.5", "--steps", "1", "--batch", "4",
         "--alignment", f"encoder,tiny={weights}", "--out", str(tmp_path / "o")], StubModel(0.4))
    report = json.loads((tmp_path / "o" / "kshot.json").read_text())
    spaces = report["results"]["0.5"]["alignment"]
    (own, _), (tiny, a_tiny) = spaces.items()
    assert "stub-pool" in own and "checkpoint" in own and tiny == "tiny (enc.pth)"
    enc = encoders.load_encoder("tiny", str(weights))
    test_image = {c: pages / f"page{p}" / f"{i}.png"
                  for c, (p, i) in enumerate((p, i) for p, n in enumerate([5, 6, 4]) for i in range(n))}
    as_tensor = lambda f: torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    files = sorted((tmp_path / "o" / "samples_w0.5").glob("*.png"))   # cond{test image}_s{j}.png
    emb = lambda fs: enc(enc.preprocess(torch.cat([as_tensor(f) for f in fs])))[0].double()
    cosines = torch.nn.functional.cosine_similarity(emb(files), emb([test_image[int(f.name[4:10])] for f in files]))
    assert len(cosines) == 15 and abs(a_tiny - cosines.mean().item()) < 1e-5 and a_tiny < 0.999
    table = (tmp_path / "o" / "kshot.md").read_text()
    assert "tiny (enc.pth)" in table and "stub-pool" in table and table.count("alignment") >= 4


@pytest.mark.filterwarnings("ignore:FID with")
def test_batch_splits_one_images_samples_and_resume_redraws_nothing(tmp_path):
    """One page of 13 images, K = 1: 13 samples of one image; --batch 4 keeps every call <= 4 and gives
    the features of --batch 13; a rerun reads the samples back; a deleted sample alone is redrawn."""
    pages = write_pages(tmp_path / "d", [13])
    args = ["--few-shot", "1", "--data", str(pages), "--guidance", "0,1", "--steps", "1"]
    big, small = StubModel(0.5), StubModel(0.5)
    run([*args, "--batch", "13", "--out", str(tmp_path / "big")], big)
    run([*args, "--batch", "4", "--out", str(tmp_path / "small")], small)
    assert max(len(c) * n for c, _, _, n in big.calls) == 13 and max(len(c) * n for c, _, _, n in small.calls) == 4
    for w in ("0", "1"):
        f_big, f_small = (np.load(tmp_path / d / f"features_w{w}.0.npy") for d in ("big", "small"))
        assert f_big.shape == (13, 12) and np.abs(f_big - f_small).max() < 1e-6
        assert np.abs(f_big[0] - f_big[1]).max() > 0.01          # distinct samples of the one image
    again = StubModel(0.5)
    (gone,) = (tmp_path / "small" / "samples_w1.0").glob("cond*_s6.png")   # sample 6 of the one condition
    gone.unlink()
    run([*args, "--batch", "4", "--out", str(tmp_path / "small")], again)
    assert [(len(c), first, s0, n) for c, first, s0, n in again.calls] == [(1, 0, 6, 1)]
    assert np.abs(np.load(tmp_path / "small" / "features_w1.0.npy") - np.load(tmp_path / "big" / "features_w1.0.npy")).max() < 1e-6
    with pytest.raises(SystemExit):           # another seed in the same folder: refused, nothing mixed
        run([*args, "--batch", "4", "--seed", "1", "--out", str(tmp_path / "small")], StubModel(0.5))


# ------------------------------------------------------------------------------------ processes
DRIVER = """import sys
sys.path[:0] = [{root!r}, {tests!r}]
import sample, test_sample
model = test_sample.StubModel(0.5)
sample.load_model = lambda cfg, device: model
sample.main(sample.parse_args(["--ckpt", "stub.pt", *sys.argv[1:]]))
"""


@pytest.mark.slow                             # ~30 s on a loaded 2-core machine: two torch start-ups
@pytest.mark.filterwarnings("ignore:FID with")
def test_two_gloo_processes_give_the_features_of_one(tmp_path):
    """torchrun --nproc_per_node=2 (gloo): each rank draws half of the plan, rank 0 gathers; the features,
    metrics and sample files equal a 1-process run with another --batch (the noise depends on (seed, k, s))."""
    pages = write_pages(tmp_path / "d", [5, 6, 4])
    args = ["--few-shot", "2", "--data", str(pages), "--guidance", "0,1", "--steps", "1"]
    run([*args, "--batch", "5", "--out", str(tmp_path / "one")], StubModel(0.5))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=ROOT, tests=os.path.join(ROOT, "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(driver), *args, "--batch", "2", "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for w in ("0.0", "1.0"):
        one, two = (np.load(tmp_path / d / f"features_w{w}.npy") for d in ("one", "two"))
        assert one.shape == (15, 12) and np.abs(one - two).max() < 1e-6
        assert sorted(os.listdir(tmp_path / "one" / f"samples_w{w}")) == sorted(os.listdir(tmp_path / "two" / f"samples_w{w}"))
    r1, r2 = (json.loads((tmp_path / d / "kshot.json").read_text())["results"] for d in ("one", "two"))
    for w in r1:
        for key in ("fid", "precision", "recall"):
            assert abs(r1[w][key] - r2[w][key]) < 1e-6
        assert abs(list(r1[w]["alignment"].values())[0] - list(r2[w]["alignment"].values())[0]) < 1e-6


# ------------------------------------------------------------------- the real model (checkpoint)
def save_tiny_checkpoint(path, seed=0):
    """A tiny-32 Semantica (init seeded by `seed`) with a random tiny encoder, saved at step 1000 in train.py's
    format (semantica.py contract)."""
    torch.manual_seed(seed)
    model = semantica.Semantica(uvit.PRESETS["tiny-32"], encoder=encoders.load_encoder("tiny", seed=3))
    state = model.state_dict()
    semantica.save_checkpoint(path, {**semantica.checkpoint_header(model), "model": state, "ema": state,
                                     "step": 1000, "ema_decay": 0.9})
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt.pt")


@pytest.mark.filterwarnings("ignore:FID with")
def test_real_model_batch_bounds_the_network_and_does_not_change_samples(ckpt, tmp_path):
    """One page of 5 images, K = 1 (5 samples of one image): --batch 2 keeps every network call <= 2 x 2
    (guidance doubles it) and gives the samples of --batch 5."""
    pages = write_pages(tmp_path / "d", [5])
    seen = {}
    for batch in (5, 2):
        model = sample.load_model(sample.parse_args(["--ckpt", ckpt, "--images", "x.png"]), "cpu")
        sizes, forward = [], model.net.forward
        model.net.forward = lambda z, t, c, *a, sizes=sizes, forward=forward, **k: (sizes.append(len(z)),
                                                                                forward(z, t, c, *a, **k))[1]
        run(["--few-shot", "1", "--data", str(pages), "--guidance", "0.5", "--steps", "1", "--batch", str(batch),
             "--out", str(tmp_path / f"b{batch}")], model)
        assert max(sizes) == 2 * batch
        seen[batch] = np.load(tmp_path / f"b{batch}" / "features_w0.5.npy")
    assert np.abs(seen[5] - seen[2]).max() < 1e-5


@pytest.mark.slow                             # ~2 min on a loaded 2-core machine (20 s idle)
def test_real_model_grid_does_not_depend_on_batch(ckpt, tmp_path):
    """An image's variations do not depend on which other images share its call."""
    pages = write_pages(tmp_path / "d", [2])
    grid_a, grid_b = tmp_path / "a.png", tmp_path / "b.png"
    images = [str(pages / "page0" / f"{i}.png") for i in range(2)]
    for out, batch in ((grid_a, "1"), (grid_b, "3")):
        sample.main(sample.parse_args(["--ckpt", ckpt, "--images", *images, "--n", "2", "--guidance", "0,1",
                                       "--steps", "2", "--batch", batch, "--out", str(out)]))
    assert np.array_equal(np.asarray(Image.open(grid_a)), np.asarray(Image.open(grid_b)))


def test_missing_encoder_weights_is_a_one_line_error(tmp_path, capsys):
    weights = tmp_path / "enc.pth"
    encoders.save_dinov2(encoders.load_encoder("tiny", seed=1), weights)
    model = semantica.Semantica(uvit.PRESETS["tiny-32"], encoder=encoders.load_encoder("tiny", weights=str(weights)))
    path = tmp_path / "ckpt.pt"
    semantica.save_checkpoint(path, {**semantica.checkpoint_header(model), "model": model.state_dict(),
                                     "ema": model.state_dict(), "step": 1000, "ema_decay": 0.9})
    weights.unlink()
    with pytest.raises(SystemExit) as e:
        sample.load_model(sample.parse_args(["--ckpt", str(path), "--images", "a.png"]), "cpu")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--encoder-weights" in err[0] and str(path) in err[0]


@pytest.mark.filterwarnings("ignore:FID with")
def test_samples_of_a_model_retrained_to_the_same_path_and_step_are_not_reused(tmp_path, capsys):
    """The default job writes runs/tiny/ckpt.pt at its last step whatever it learnt: a rerun into the same --out
    must not score the old model's samples. Other weights at the same path and step: refused in one line,
    nothing drawn; the same weights written again: accepted, its samples read back."""
    pages, path, out = write_pages(tmp_path / "d", [4]), tmp_path / "ckpt.pt", tmp_path / "o"
    args = ["--ckpt", str(path), "--few-shot", "1", "--data", str(pages), "--guidance", "0.5", "--steps", "1",
            "--device", "cpu", "--out", str(out)]
    save_tiny_checkpoint(path, seed=0)
    sample.main(sample.parse_args(args))
    drawn = {f.name: f.read_bytes() for f in (out / "samples_w0.5").iterdir()}
    save_tiny_checkpoint(path, seed=1)                  # retrained: same path, same step, other weights
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sample.main(sample.parse_args(args))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "another run" in last and "weights" in last and "new --out" in last
    assert {f.name: f.read_bytes() for f in (out / "samples_w0.5").iterdir()} == drawn
    save_tiny_checkpoint(path, seed=0)                  # the first weights, in a new file
    sample.main(sample.parse_args(args))
    assert {f.name: f.read_bytes() for f in (out / "samples_w0.5").iterdir()} == drawn


@pytest.mark.filterwarnings("ignore:FID with")
def test_reports_say_in_one_line_when_their_networks_are_not_the_papers(tmp_path, capsys):
    """The defaults (the checkpoint's encoder for FID and alignment) are neither §7's Inception-v3 nor §8.2's
    CLIP B/16 and DINOv2 B: kshot.json, kshot.md and the console each carry one line saying so. Only
    Inception features with both alignment spaces, with weights, are the paper's."""
    pages = write_pages(tmp_path / "d", [4, 4])
    run(["--few-shot", "1", "--data", str(pages), "--guidance", "0.5", "--steps", "1", "--out", str(tmp_path / "o")],
        StubModel())
    line = json.loads((tmp_path / "o" / "kshot.json").read_text())["not_the_papers_networks"]
    assert "Inception-v3" in line and "CLIP B/16 and DINOv2 B" in line and "stub-pool" in line
    assert (tmp_path / "o" / "kshot.md").read_text().splitlines().count(line) == 1
    assert capsys.readouterr().out.splitlines().count(line) == 1
    net = lambda name, weights="w.pth": SimpleNamespace(name=name, weights=weights)  # noqa: E731
    assert sample_runs.networks_warning("inception", [net("dinov2-b14"), net("clip-b16")]) is None
    only_fid = sample_runs.networks_warning("dinov2-l14", [net("clip-b16"), net("dinov2-b14")])
    assert "dinov2-l14 features" in only_fid and "alignment" not in only_fid
    for spaces in ([net("dinov2-b14")], [net("dinov2-b14", None), net("clip-b16")],
                   [net("dinov2-l14"), net("clip-b16")]):
        warning = sample_runs.networks_warning("inception", spaces)
        assert "alignment in" in warning and "Inception" not in warning


@pytest.mark.parametrize("mode", ["grid", "few-shot"])
def test_a_closed_output_pipe_loses_no_samples(ckpt, tmp_path, mode):
    """`sample.py ... 2>&1 | head -0` (or a killed `tee`): prints, progress bars and the report go nowhere, the
    run ends normally (status 0) with every sample and its report written."""
    pages = write_pages(tmp_path / "d", [4])
    out = ["--images", str(pages / "page0" / "0.png"), "--n", "2", "--out", str(tmp_path / "g.png")] \
        if mode == "grid" else ["--few-shot", "1", "--data", str(pages), "--out", str(tmp_path / "o")]
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", ckpt, "--steps", "2",
                          "--device", "cpu", *out], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    p.stdout.close()                                    # the reader is gone before the first write
    assert p.wait(timeout=300) == 0
    if mode == "grid":
        assert (tmp_path / "g.png").exists() and len(list((tmp_path / "g").glob("img0_w0.5_s*.png"))) == 2
    else:
        assert json.loads((tmp_path / "o" / "kshot.json").read_text())["n"] == 4
        assert len(list((tmp_path / "o" / "samples_w0.5").glob("*.png"))) == 4


@pytest.fixture
def torch_flags(monkeypatch):
    """Restores the torch settings --deterministic changes (and CUBLAS_WORKSPACE_CONFIG) after a test."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")   # recorded as unset: removed again afterwards
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (torch.are_deterministic_algorithms_enabled(), matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark,
             cudnn.deterministic)
    yield
    torch.use_deterministic_algorithms(saved[0])
    matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic = saved[1:]


def test_deterministic_turns_tf32_off_and_deterministic_algorithms_on(ckpt, tmp_path, torch_flags):
    """--deterministic (GPUs): no TF32 matmuls or convolutions, no cuDNN autotuning, deterministic kernels only
    and cuBLAS's fixed workspace (PyTorch's reproducibility settings). On a CPU the grid is the same image."""
    image = str(write_pages(tmp_path / "d", [1]) / "page0" / "0.png")
    grids = []
    for flag in ("--no-deterministic", "--deterministic"):
        out = tmp_path / f"{flag}.png"
        sample.main(sample.parse_args(["--ckpt", ckpt, "--images", image, "--n", "2", "--steps", "2",
                                       "--device", "cpu", flag, "--out", str(out)]))
        grids.append(np.asarray(Image.open(out)))
        if flag == "--no-deterministic":
            assert not torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32 or torch.backends.cudnn.benchmark)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert np.array_equal(*grids)
