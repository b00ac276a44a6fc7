"""Tests for pages/toy_encoder.py, the CPU job's pretrained encoder (not part of the paper): SigLIP's loss
against a brute-force reading of its Eq. 1, the cached, atomic weight file, and the official-format round trip."""
import math
import os

import pytest
import torch

import encoders
from pages import synthetic
from pages import toy_encoder


def test_sigmoid_loss_is_siglip_eq_1_by_brute_force():
    """-1/|B| sum_i sum_j log(1 / (1 + exp(z_ij (-t x_i . y_j - b)))), z_ij = 1 for a match, -1 otherwise."""
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    same = torch.eye(5, dtype=torch.bool)
    same[1, 3] = same[3, 1] = True                       # two identical alt texts match each other too
    log_t, b = torch.tensor(math.log(7.0)), torch.tensor(-3.0)
    want = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if same[i, j] else -1.0
            want -= math.log(1 / (1 + math.exp(z * (-7.0 * float(x[i] @ y[j]) + 3.0))))
    assert toy_encoder.sigmoid_loss(x, y, same, log_t, b).item() == pytest.approx(want / 5, rel=1e-5)


def test_alt_text_bank_ids_are_the_words():
    images, ids = toy_encoder.alt_text_bank(3, seed=1, size=16)
    pages = synthetic.SyntheticPages(3, 16, seed=1)
    words = [pages.alt_text(p, i) for p in range(3) for i in range(pages.count(p))]
    assert images.shape == (len(words), 3, 16, 16)
    assert [tuple(synthetic.WORDS[k] for k in row) for row in ids.tolist()] == words


def test_pretrained_trains_once_writes_official_layout_and_reuses(tmp_path, monkeypatch):
    calls = []
    real = toy_encoder.train_encoder
    monkeypatch.setattr(toy_encoder, "train_encoder", lambda **kw: calls.append(kw) or real(**kw))
    kw = dict(steps=2, num_pages=4, batch=4)
    path = toy_encoder.pretrained(str(tmp_path), log=lambda *a: None, **kw)
    assert os.path.isabs(path) and os.path.exists(path) and os.path.exists(path + ".json") and len(calls) == 1
    assert [f for f in os.listdir(tmp_path) if ".tmp" in f] == []               # atomic: no leftovers
    assert toy_encoder.pretrained(str(tmp_path), log=lambda *a: None, **kw) == path and len(calls) == 1  # cached
    enc = encoders.load_encoder("tiny", weights=path)                           # the official DINOv2 layout
    assert enc.weights == path
    fresh = encoders.load_encoder("tiny", seed=0)
    assert any(not torch.equal(a, b) for a, b in zip(enc.state_dict().values(), fresh.state_dict().values()))  # trained
    other = toy_encoder.pretrained(str(tmp_path), log=lambda *a: None, steps=3, num_pages=4, batch=4)
    assert other != path and len(calls) == 2                                    # another recipe, another file


def test_the_committed_weights_are_the_recipe_of_this_version():
    """The job loads weights/ by the hash of toy_encoder.recipe(): a recipe change without new weights would
    make `python train.py` retrain for minutes, so the committed file must carry today's recipe's name."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    names = os.listdir(os.path.join(root, "weights"))
    calls = []
    path = toy_encoder.pretrained(os.path.join(root, "weights"), log=calls.append)
    assert calls == [] and os.path.basename(path) in names
