"""sample.py: Fig. 1 / Fig. 14 grids of the expected size, the K-shot report, clear errors on bad input."""
import json
import math

import pytest
from PIL import Image

import data
import sample
import train


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train.main(train.parse_args(["--steps", "2", "--batch", "8", "--num-pages", "32", "--sample-steps", "1",
                                 "--grid-images", "1", "--grid-n", "1", "--out", str(out)]))
    return str(out / "ckpt.pt")


@pytest.fixture(scope="module")
def pages_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pages")
    data.SyntheticPages(num_pages=4, image_size=32, seed=1, images_per_page=(3, 4)).write(str(root))
    return root


def test_grid_is_condition_then_n_samples_per_guidance(ckpt, pages_dir, tmp_path):
    images = sorted(str(p) for p in pages_dir.rglob("*.png"))[:2]
    out = tmp_path / "grid.png"
    sample.main(sample.parse_args(["--ckpt", ckpt, "--images", *images, "--n", "2", "--guidance", "0,0.5",
                                   "--steps", "2", "--out", str(out)]))
    assert Image.open(out).size == ((1 + 2 * 2) * 34 + 2, 2 * 34 + 2)  # 2 rows, condition + 2 x 2 samples


@pytest.mark.filterwarnings("ignore:FID with")  # 12 samples < D: tiny on purpose
def test_few_shot_writes_json_and_markdown_table(ckpt, pages_dir, tmp_path):
    cfg = sample.parse_args(["--ckpt", ckpt, "--few-shot", "1", "--data", str(pages_dir), "--per-group", "3",
                             "--guidance", "0", "1", "--steps", "2", "--out", str(tmp_path)])
    sample.main(cfg)
    report = json.load(open(tmp_path / "kshot.json"))
    assert report["n"] == 12 and report["k"] == 1 and "RANDOM weights" in report["features"]
    for w in ("0.0", "1.0"):
        r = report["results"][w]
        assert r["n"] == 12 and all(math.isfinite(r[k]) for k in ("fid", "precision", "recall", "alignment"))
    assert len(list((tmp_path / "samples_w1.0").glob("*.png"))) == 12
    table = (tmp_path / "kshot.md").read_text().splitlines()
    assert "| guidance | FID | precision | recall | alignment |" in table and len(table) == 6


def test_bad_input_gives_clear_errors(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sample.parse_args(["--images", "a.png"])
    assert e.value.code == 2 and "--ckpt is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        sample.parse_args(["--ckpt", ckpt, "--images", "a.png", "--guidance", "half"])
    assert e.value.code == 2
    with pytest.raises(SystemExit, match="no checkpoint"):
        sample.main(sample.parse_args(["--ckpt", str(tmp_path / "none.pt"), "--images", "a.png"]))
    with pytest.raises(SystemExit, match="cannot read conditioning image"):
        sample.main(sample.parse_args(["--ckpt", ckpt, "--images", str(tmp_path / "missing.png"), "--steps", "1"]))
