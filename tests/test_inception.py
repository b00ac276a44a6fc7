"""Tests for inception.py: FID Inception-v3 key layout, strict loading, pytorch-fid goldens, shapes.

Golden features come from pytorch-fid 0.3.0 run on the same random weights
(scripts/make_inception_goldens.py); the real weights file cannot be downloaded here.
"""
import os

import numpy as np
import pytest
import torch

from machinery import inception
import metrics

GOLDENS = os.path.join(os.path.dirname(__file__), "data", "inception", "goldens.npz")


@pytest.fixture(scope="module")
def state():
    return inception.random_state_dict(seed=0)


@pytest.fixture(scope="module")
def weights_path(state, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / inception.WEIGHTS_FILE
    torch.save(state, path)
    return str(path)


@pytest.fixture(scope="module")
def net(weights_path):
    return inception.load_inception(weights_path)


def _to_signed(u8):
    return torch.from_numpy(u8).float() / 127.5 - 1.0  # uint8 -> [-1, 1]


def test_random_weights_in_file_layout_load_strictly(net, state):
    # Names and shapes of pytorch-fid's fid_inception_v3() (= the weights file): 566 entries,
    # torchvision's Inception3 names, no AuxLogits, a 1008-way fc.
    assert len(state) == 566
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert state["fc.weight"].shape == (inception.NUM_CLASSES, inception.FEATURE_DIM)
    assert not any(k.startswith("AuxLogits") for k in state)
    loaded = net.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    # frozen and in eval mode, and .train() cannot switch batch norm to batch statistics
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    net.train()
    assert not any(m.training for m in net.modules())


def test_state_dict_without_bn_counters_loads(state, tmp_path):
    # An older-PyTorch state dict has no BatchNorm num_batches_tracked; PyTorch accepts it, so do we.
    path = tmp_path / "old_format.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    loaded = inception.load_inception(str(path)).state_dict()
    assert torch.equal(loaded["Mixed_6e.branch7x7dbl_5.bn.running_var"],
                       state["Mixed_6e.branch7x7dbl_5.bn.running_var"])


def test_wrapper_prefixes_load_the_same_network(net, state, tmp_path):
    """A file saved from a DDP-wrapped or compiled model ("module." / "_orig_mod." in any order, the one key
    rule of every file read): the same network, the same pytorch-fid golden features."""
    g = np.load(GOLDENS)
    x = _to_signed(g["images_64"])
    for prefix in ("_orig_mod.module.", "module.module."):
        path = tmp_path / f"{prefix}pth"
        torch.save({prefix + k: v for k, v in state.items()}, path)
        out = inception.load_inception(str(path))(x)
        assert torch.equal(out, net(x))
        assert (out - torch.from_numpy(g["features_64"])).abs().max() <= 1e-4


def test_wrong_files_give_clear_errors(state, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        inception.load_inception(str(tmp_path / "nowhere.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth") as e:
        inception.load_inception(str(garbage))
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)   # one line, no unsafe advice
    # torchvision's (non-FID) Inception-v3 layout: AuxLogits and a 1000-way classifier
    tv = dict(state)
    tv["fc.weight"], tv["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    tv["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    del tv["Mixed_7c.branch_pool.conv.weight"]
    path = tmp_path / "inception_v3_google.pth"
    torch.save(tv, path)
    with pytest.raises(ValueError) as err:
        inception.load_inception(str(path))
    msg = str(err.value)
    for needle in ("inception_v3_google.pth", "AuxLogits.fc.weight", "Mixed_7c.branch_pool.conv.weight",
                   "fc.weight: file (1000, 2048) vs model (1008, 2048)"):
        assert needle in msg
    not_a_dict = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), not_a_dict)
    with pytest.raises(ValueError, match="tensor.pth"):
        inception.load_inception(str(not_a_dict))


def test_matches_pytorch_fid_goldens(net, state):
    """Same random weights, same images: ours == pytorch-fid 0.3.0 to 1e-4 (seen: <= 6e-6).

    Covers the FID-specific blocks (count_include_pad=False pools, max pool in Mixed_7c) and the
    input path (bilinear resize to 299 with align_corners=False: up, none, non-square, down).
    Each of those, changed, moves the features by 0.2-4.4, far above the tolerance."""
    g = np.load(GOLDENS)
    fingerprint = sum(v.double().abs().sum() for v in state.values() if v.is_floating_point())
    assert int(g["seed"]) == 0
    assert float(fingerprint) == pytest.approx(float(g["weights_fingerprint"]), rel=1e-9), \
        "random_state_dict no longer reproduces the weights the goldens were made with"
    for name in ("64", "299", "100x150", "320"):
        images, want = g[f"images_{name}"], g[f"features_{name}"]
        # the four 64x64 images go through the batched helper (batches of 3 and 1)
        got = torch.from_numpy(metrics.extract_features(net, _to_signed(images), batch_size=3, progress=False))
        assert got.shape == (images.shape[0], inception.FEATURE_DIM) and got.dtype == torch.float32
        err = (got - torch.from_numpy(want)).abs().max().item()
        assert err <= 1e-4, f"{name}: max |ours - pytorch-fid| = {err:.2e}"


def test_bf16_inputs_and_autocast_still_give_float32_features(net):
    x = (torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1).bfloat16()
    ref = net(x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, ref)  # no bf16 anywhere inside: identical to the float32 run


def test_bad_inputs_raise(net):
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        net(torch.full((1, 3, 8, 8), 255.0))       # uint8-range images
    with pytest.raises(ValueError, match="B, 3, H, W"):
        net(torch.zeros(1, 1, 8, 8))               # grayscale


def test_folder_path_resizes_each_image_on_its_own_like_pytorch_fid(net, weights_path):
    """metrics' feature network brings every image to 299x299 by itself (pytorch-fid's bilinear
    resize inside the network), so images of different sizes batch together and a file's features
    do not depend on its neighbours: equal to the network run on each image alone."""
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(3, h, w, generator=g) * 2 - 1 for h, w in ((40, 56), (299, 299), (64, 64))]
    fn = metrics.feature_network("inception", weights_path)
    got = torch.from_numpy(metrics.extract_features(fn, images, batch_size=2, progress=False))
    want = torch.cat([net(x[None]) for x in images])
    assert (got - want).abs().max().item() <= 1e-4


def test_missing_weights_say_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="pytorch-fid/releases"):
        inception.load_inception(str(tmp_path / inception.WEIGHTS_FILE))
    with pytest.raises(ValueError, match=inception.WEIGHTS_FILE):
        metrics.feature_network("inception")                    # no weights, no --random-weights
    rand = metrics.feature_network("inception", allow_random=True)
    assert rand.name == "inception-v3 pool3 (RANDOM weights)"
    assert all(torch.equal(rand.net.state_dict()[k], v) for k, v in inception.random_state_dict(0).items())
