"""train.py --backend xla on CPU (PJRT_DEVICE=CPU): steps, exact resume, SIGTERM, bf16, sampling, 2 replicas (xfail).

Run with `bash scripts/test_xla.sh` (a virtualenv with torch 2.9.0 + torch_xla 2.9.0, built once). Every
test here is marked `xla` and skips where torch_xla is not importable (the project's own environment and
CI); the script sets SEMANTICA_REQUIRE_XLA=1, which turns that skip into an import error.
train.py runs as a subprocess, as a user would start it: `torch_xla.launch` runs the training function
in a child process (one thread per CPU device), which cannot run inside pytest's process.
The checkpoint is sampled with sample.py under $SEMANTICA_MAIN_PYTHON (the project's own torch, set by
the script; default: this python), so the XLA checkpoint is checked to be a plain torch checkpoint.
What this cannot cover (needs a TPU): TPU compilation and memory, multi-host, the `xla://` process group.
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

pytestmark = pytest.mark.xla
REPO = Path(__file__).resolve().parents[1]
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
            "XLA_FLAGS": FAST_COMPILE}


def train(out, *flags, devices=1):
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
    return out, train(out, "--steps", "4")


def test_single_device_trains_logs_every_step_and_saves(full):
    out, stdout = full
    assert "backend xla" in stdout and "world 1" in stdout
    log = losses(out)
    assert sorted(log) == [1, 2, 3, 4]
    assert all(0 < v < 10 for v in log.values()), log  # finite eps-space MSE of unit-variance noise
    ckpt = checkpoint(out)
    assert ckpt["step"] == 4 and ckpt["world"] == 1
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())  # plain CPU tensors, no XLA storage
    assert "no variation grid under --backend xla" in stdout  # train.py xla_skip_grid: sample.py draws it


def test_resume_continues_the_uninterrupted_loss_sequence(full, tmp_path):
    train(tmp_path, "--steps", "2")
    train(tmp_path, "--steps", "4", "--resume")
    reference, resumed = losses(full[0]), losses(tmp_path)
    assert sorted(resumed) == [1, 2, 3, 4]
    # same data position, same per-step device RNG seeds (xm.set_rng_state), same Adam state
    for step in (3, 4):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=0), step


def test_bf16_autocast_is_applied_and_stays_close_to_fp32(full, tmp_path):
    train(tmp_path, "--steps", "2", "--no-bf16")
    bf16, fp32 = losses(full[0]), losses(tmp_path)
    # Both runs draw the same t, eps and dropout (the RNG is seeded per step, not per dtype). At step 1 the
    # zero-initialised output layer predicts v = 0 whatever the precision, so the losses are equal; Adam's
    # first update is lr x sign(gradient) in both; at step 2 only the bf16 rounding of the network differs.
    assert bf16[1] == pytest.approx(fp32[1], rel=1e-6)
    assert bf16[2] == pytest.approx(fp32[2], rel=5e-2)
    assert bf16[2] != fp32[2], "--bf16 changed nothing: autocast was not active on the XLA device"


@pytest.mark.xfail(reason="NOT WORKING YET: with CPU_NUM_DEVICES=2 the two replica threads' first all-reduce "
                          "(xm.broadcast_master_param) never meets: XLA:CPU aborts after 10 s, one thread waiting at "
                          "op_id=1, the other at op_id=0. A thread barrier before it and a broadcast with the 0/1 "
                          "weight as data instead of a constant did not help. Cause not found.", strict=False)
def test_two_cpu_devices_train_as_two_replicas(tmp_path):
    stdout = train(tmp_path, "--steps", "2", devices=2)  # global batch 4 = micro-batch 2 x 2 replicas
    assert "world 2" in stdout and "micro-batch 2" in stdout
    assert sorted(losses(tmp_path)) == [1, 2]
    ckpt = checkpoint(tmp_path)
    assert ckpt["step"] == 2 and ckpt["world"] == 2 and ckpt["data_position"] == 2


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
