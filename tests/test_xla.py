"""train.py --backend xla on CPU (PJRT_DEVICE=CPU): steps, grids, exact resume, SIGTERM, bf16, sampling with
sample.py under the main torch, two replicas (CPU_NUM_DEVICES=2) with averaged gradients, the XLA sampler.

Run with `bash scripts/test_xla.sh` (a virtualenv with torch 2.9.0 + torch_xla 2.9.0, built once). Every
test here is marked `xla` and skips where torch_xla is not importable (the project's own environment and
CI); the script sets SEMANTICA_REQUIRE_XLA=1, which turns that skip into an import error.
train.py runs as a subprocess, as a user would start it: `torch_xla.launch` runs the training function
in a child process (one thread per CPU device), which cannot run inside pytest's process. The two-replica
and sampler checks run this file as a script (`python tests/test_xla.py replicas|sampler OUT`, see the bottom),
which writes what each replica computed; the tests compare it with plain-torch CPU references computed here.
The checkpoint is sampled with sample.py under $SEMANTICA_MAIN_PYTHON (the project's own torch, set by
the script; default: this python), so the XLA checkpoint is checked to be a plain torch checkpoint.
What this cannot cover (needs a TPU): TPU compilation and memory, the TPU collectives (xm.all_reduce,
xm.collective_broadcast; XLA:CPU takes backends.xla_reduce's all-gather route), multi-host, `xla://`.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

if os.environ.get("SEMANTICA_REQUIRE_XLA"):
    import torch_xla  # noqa: F401  (scripts/test_xla.sh: a missing torch_xla is an error)
else:
    pytest.importorskip("torch_xla")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # train.py and the modules it imports, when this file runs as a script
from machinery import backends  # noqa: E402
import train  # noqa: E402

pytestmark = pytest.mark.xla
# The default job (tiny-32, synthetic pages, random tiny encoder) shrunk to seconds per step (once compiled).
FAST = ["--backend", "xla", "--res", "32", "--batch", "4", "--num-pages", "16", "--log-every", "1",
        "--sample-every", "1000", "--sample-steps", "1", "--grid-images", "1", "--grid-n", "1", "--num-workers", "0"]
TIMEOUT = 900  # seconds per train.py run: XLA compiles the step graph on a shared 2-core machine


# Compiling the step graph dominates a CPU run; LLVM's optimisations do not change the math.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_env(devices):
    """PJRT on CPU with `devices` replicas (torch_xla 2.9: CPU_NUM_DEVICES, one thread per device).
    No persistent compilation cache: XLA:CPU cannot load one ("Deserializing serialized executable not
    supported"), so every run compiles its step graphs again."""
    return {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(devices), "PYTHONUNBUFFERED": "1",
            "XLA_FLAGS": FAST_COMPILE, "PYTHONPATH": str(REPO)}


def run_script(mode, out, devices):
    """`python tests/test_xla.py MODE OUT` on `devices` CPU devices (the workers at the bottom) -> stdout."""
    cmd = [sys.executable, __file__, mode, str(out)]
    p = subprocess.run(cmd, env=xla_env(devices), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p.stdout


def run_train(out, *flags, devices=1):
    """Run train.py on XLA to completion; -> its stdout. A failure shows the tail of its output."""
    cmd = [sys.executable, str(REPO / "train.py"), *FAST, "--out", str(out), *flags]
    p = subprocess.run(cmd, env=xla_env(devices), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p.stdout


def losses(out):
    """{step: loss} from OUT/log.jsonl (a resumed run appends to the same file)."""
    return {r["step"]: r["loss"] for r in map(json.loads, open(Path(out) / "log.jsonl"))}


def checkpoint(out):
    return torch.load(Path(out) / "ckpt.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """One device, 4 uninterrupted steps, bf16 (the XLA default): the reference for the other tests."""
    out = tmp_path_factory.mktemp("full")
    return out, run_train(out, "--steps", "4")


def test_single_device_trains_logs_every_step_and_saves(full):
    out, stdout = full
    assert "backend xla" in stdout and "world 1" in stdout
    log = losses(out)
    assert sorted(log) == [1, 2, 3, 4]
    assert all(0 < v < 10 for v in log.values()), log  # finite eps-space MSE of unit-variance noise
    ckpt = checkpoint(out)
    assert ckpt["step"] == 4 and ckpt["world"] == 1
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())  # plain CPU tensors, no XLA storage
    grid = Image.open(out / "variations_0000004.png")  # at the last step: 1 row, the condition + 1 variation
    assert grid.size[0] >= 2 * 32 and grid.size[1] >= 32


def test_resume_continues_the_uninterrupted_loss_sequence(full, tmp_path):
    run_train(tmp_path, "--steps", "2")
    run_train(tmp_path, "--steps", "4", "--resume")
    reference, resumed = losses(full[0]), losses(tmp_path)
    assert sorted(resumed) == [1, 2, 3, 4]
    # same data position, same per-step device RNG seeds (xm.set_rng_state), same Adam state
    for step in (3, 4):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=0), step


def test_bf16_autocast_is_applied_and_stays_close_to_fp32(full, tmp_path):
    run_train(tmp_path, "--steps", "2", "--no-bf16")
    bf16, fp32 = losses(full[0]), losses(tmp_path)
    # Both runs draw the same t, eps and dropout (the RNG is seeded per step, not per dtype). At step 1 the
    # zero-initialised output layer predicts v = 0 whatever the precision, so the losses are equal; Adam's
    # first update is lr x sign(gradient) in both; at step 2 only the bf16 rounding of the network differs.
    assert bf16[1] == pytest.approx(fp32[1], rel=1e-6)
    assert bf16[2] == pytest.approx(fp32[2], rel=5e-2)
    assert bf16[2] != fp32[2], "--bf16 changed nothing: autocast was not active on the XLA device"


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    cmd = [sys.executable, str(REPO / "train.py"), *FAST, "--out", str(tmp_path), "--steps", "1000",
           "--ckpt-every", "1000"]
    p = subprocess.Popen(cmd, env=xla_env(1), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + TIMEOUT
        while not (tmp_path / "log.jsonl").exists():  # the replica runs (xla_launch set the handlers first)
            assert p.poll() is None and time.time() < deadline, p.communicate()[0][-5000:]
            time.sleep(0.5)
        p.send_signal(signal.SIGTERM)  # to the launching process only, as a scheduler would
        output = p.communicate(timeout=TIMEOUT)[0]
    finally:
        p.kill()
    assert p.returncode == 128 + signal.SIGTERM, output[-5000:]  # train.py's exit status after a signal
    assert "stopped by signal" in output
    step = checkpoint(tmp_path)["step"]
    assert 1 <= step < 1000 and max(losses(tmp_path)) == step


def test_xla_checkpoint_samples_with_sample_py_under_the_main_torch(full, tmp_path):
    out, _ = full
    cond = tmp_path / "cond.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(cond)
    python = os.environ.get("SEMANTICA_MAIN_PYTHON", sys.executable)
    cmd = [python, str(REPO / "sample.py"), "--ckpt", str(out / "ckpt.pt"), "--images", str(cond), "--n", "2",
           "--steps", "2", "--out", str(tmp_path / "grid.png")]
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_DEVICE", "CPU_NUM_DEVICES", "PYTHONPATH")}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size[1] > 32 and grid.size[0] >= 3 * 32  # 1 row: the condition + 2 samples


# ----------------------------------------------------------------------------- two replicas, the sampler

def fixed_batch(n=8, size=32):
    """Targets, conditioning images (B, 3, size, size) in [-1, 1], times t (B,) and noise eps, from seed 1."""
    g = torch.Generator().manual_seed(1)
    x, cond = (torch.rand(n, 3, size, size, generator=g) * 2 - 1 for _ in range(2))
    return x, cond, torch.rand(n, generator=g), torch.randn(n, 3, size, size, generator=g)


def test_two_cpu_devices_train_as_two_replicas_with_averaged_gradients(tmp_path):
    stdout = run_script("replicas", tmp_path, devices=2)  # global batch 4 = micro-batch 2 x 2 replicas
    assert "world 2" in stdout and "micro-batch 2" in stdout
    assert sorted(losses(tmp_path)) == [1, 2]
    ckpt = checkpoint(tmp_path)
    assert ckpt["step"] == 2 and ckpt["world"] == 2 and ckpt["data_position"] == 2
    assert Image.open(tmp_path / "variations_0000002.png").size[0] >= 2 * 32  # replica 0's grid, 3 DDPM steps
    r0, r1 = (torch.load(tmp_path / f"replica{r}.pt", weights_only=True) for r in (0, 1))
    # Each replica trained on its own half of every batch with its own noise, so only averaged gradients
    # (and replica 0's broadcast initial weights) keep them identical, bit for bit.
    for key in ("model", "ema", "grads"):
        assert r0[key].keys() == r1[key].keys() and r0[key]
        assert all(torch.equal(r0[key][k], r1[key][k]) for k in r0[key]), f"the replicas' {key} differ"
    torch.testing.assert_close(ckpt["model"], r0["model"], rtol=0, atol=0)  # the checkpoint is replica 0's
    # The averaged gradient (replica r: rows 4r..4r+3 of a fixed batch, fixed t and eps) equals the gradient of
    # the mean loss over all 8 rows, computed here by plain torch on CPU from the same (trained) weights.
    model = train.build_model(train.parse_args(FAST), train.load_frozen_encoder(train.parse_args(FAST)))
    model.load_state_dict(r0["model"])
    model.p_uncond = 0.0  # as in the worker: every condition kept, nothing drawn
    x, cond, t, eps = fixed_batch()
    halves = [slice(0, 4), slice(4, 8)]
    (sum(model.loss(x[h], cond[h], t=t[h], eps=eps[h]) for h in halves) / 2).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == r0["grads"].keys()
    assert sum(int(g.count_nonzero()) for g in grads.values()) > 0.5 * sum(g.numel() for g in grads.values())
    for n, g in grads.items():
        torch.testing.assert_close(r0["grads"][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_sampler_on_xla_draws_the_cpu_noise_and_compiles_each_step_kind_once(tmp_path):
    run_script("sampler", tmp_path, devices=1)
    res = torch.load(tmp_path / "sampler.pt", weights_only=True)
    cfg = train.parse_args(FAST)
    model = train.build_model(cfg, train.load_frozen_encoder(cfg))
    model.load_state_dict(res["state"])
    reference = model.sample(cond_images=fixed_batch()[1][:2], num_samples=2, steps=3, seed=5)
    # same noise streams (CPU generators, moved) and the same fp32 math: equal up to XLA:CPU's kernels
    torch.testing.assert_close(res["samples"], reference, rtol=0, atol=1e-4)
    # one graph per kind of DDPM step (a sync per step; t and s are data): 6 steps reuse the graphs of 3
    assert res["new_compiles"] == 0, res["new_compiles"]


def _replica(index, out):
    """`python tests/test_xla.py replicas OUT`, in each of 2 replica threads: train.main for 2 steps (what
    backends.xla_launch runs), then one averaged gradient on rows 4r..4r+3 of fixed_batch(); saves what it holds."""
    cfg = train.parse_args(FAST + ["--out", out, "--steps", "2", "--sample-steps", "3"])
    res = train.main(cfg)
    model, d = res["model"], res["dist"]
    state = {"model": {k: v.cpu() for k, v in model.state_dict().items()},
             "ema": {k: v.cpu() for k, v in res["ema"].state_dict().items()}}
    model.p_uncond = 0.0  # keep every condition: the loss draws nothing from the device RNG
    x, cond, t, eps = (v[4 * d.rank:4 * d.rank + 4].to(d.device) for v in fixed_batch())
    model.loss(x, cond, t=t, eps=eps).backward()
    backends.reduce_gradients(torch.optim.SGD(model.parameters(), lr=0.0), d)  # averages the gradients in place
    state["grads"] = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
    torch.save(state, os.path.join(out, f"replica{d.rank}.pt"))


def _sampler(out):
    """`python tests/test_xla.py sampler OUT`: Semantica.sample on the XLA device with a sync per step, for
    weights whose output depends on the input (the output layer starts at zero), and the compiles it took."""
    import torch_xla
    import torch_xla.debug.metrics as met
    cfg = train.parse_args(FAST + ["--out", out])
    torch.manual_seed(0)
    model = train.build_model(cfg, train.load_frozen_encoder(cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(torch_xla.device())
    cond = fixed_batch()[1][:2].to(torch_xla.device())
    samples = model.sample(cond_images=cond, num_samples=2, steps=3, seed=5, on_step=backends.xla_step_boundary).cpu()
    compiles = met.metric_data("CompileTime")[0]
    model.sample(cond_images=cond, num_samples=2, steps=6, seed=5, on_step=backends.xla_step_boundary).cpu()
    torch.save({"state": state, "samples": samples, "new_compiles": met.metric_data("CompileTime")[0] - compiles},
               os.path.join(out, "sampler.pt"))


if __name__ == "__main__":
    import torch_xla
    mode, out = sys.argv[1:3]
    if mode == "replicas":
        torch_xla.launch(_replica, args=(out,), start_method="fork")
    else:
        _sampler(out)
