"""train.py: the default job's code path, exact resume, signals, NaN stop, bad input, DDP and FSDP on gloo."""
import json
import os
import signal
import threading
import time

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import train

# The default job (tiny-32, synthetic pages, random tiny encoder) shrunk to seconds.
FAST = ["--batch", "8", "--num-pages", "32", "--log-every", "1", "--sample-steps", "2", "--grid-images", "2",
        "--grid-n", "2"]


def run(tmp, *flags):
    return train.main(train.parse_args(FAST + ["--out", str(tmp), *flags]))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return out, run(out, "--steps", "3", "--sample-every", "3")


def test_default_job_leaves_checkpoint_log_config_and_grid(tiny_run):
    out, result = tiny_run
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert {"step", "loss", "lr", "img_per_s", "eta_s"} <= set(log[0])
    assert json.load(open(out / "config.json"))["model"] == "tiny-32"
    ckpt = train.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == 3 and ckpt["data_position"] == 3
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert not any("encoder" in k for k in ckpt["model"])  # the frozen encoder is not part of the model state
    # the EMA moved from the initial weights, but only by (1 - decay) per step
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])
    grid = Image.open(out / "variations_0000003.png")  # 2 rows x (condition + 2 variations) of 32 px
    assert grid.size == (3 * 34 + 2, 2 * 34 + 2)


def test_resume_continues_the_uninterrupted_loss_sequence(tmp_path):
    full = run(tmp_path / "a", "--steps", "4")["losses"]
    run(tmp_path / "b", "--steps", "2")
    resumed = run(tmp_path / "b", "--steps", "4", "--resume")["losses"]
    assert [s for s, _ in resumed] == [3, 4]
    assert [l for _, l in resumed] == pytest.approx([l for _, l in full[2:]], rel=1e-6, abs=0)


def test_grad_checkpoint_recomputes_the_same_losses(tmp_path):
    plain = run(tmp_path / "a", "--steps", "2", "--grid-images", "1", "--sample-steps", "1")["losses"]
    recomputed = run(tmp_path / "b", "--steps", "2", "--grid-images", "1", "--sample-steps", "1",
                     "--grad-checkpoint")["losses"]
    assert recomputed == pytest.approx(plain, rel=1e-6)


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    log = tmp_path / "log.jsonl"

    def kill_when_training():  # the handler is installed before the first log line is written
        while not log.exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=kill_when_training, daemon=True).start()
    result = run(tmp_path, "--steps", "1000", "--ckpt-every", "1000", "--sample-every", "1000")
    assert result["step"] < 1000
    assert train.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == result["step"]
    assert signal.getsignal(signal.SIGTERM) is not None  # handlers restored afterwards


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        run(tmp_path, "--steps", "6", "--ckpt-every", "1", "--lr", "1e30")  # parameters explode after step 1
    step = train.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"]
    assert 1 <= step < 6


def test_unknown_flag_and_missing_encoder_weights_are_errors(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--no-such-flag"])
    assert e.value.code == 2 and "--no-such-flag" in capsys.readouterr().err
    cfg = train.parse_args(["--res", "256"])
    assert (cfg.model, cfg.encoder, cfg.batch, cfg.lr, cfg.ema_decay) == ("sid-b-256", "dinov2-b14", 2048, 2e-4, 0.9999)
    assert train.parse_args(["--res", "256", "--lr", "1e-3"]).lr == 1e-3  # explicit flags beat the preset
    with pytest.raises(SystemExit, match="dinov2_vitb14_pretrain.pth"):
        train.build_encoder(cfg)
    with pytest.raises(SystemExit, match="divisible"):
        train.batch_plan(train.parse_args(["--batch", "10", "--micro-batch", "4"]), world=1)


def test_bad_checkpoints_give_clear_errors(tmp_path, tiny_run):
    out, _ = tiny_run
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="not a readable"):
        train.load_checkpoint(str(tmp_path / "junk.pt"))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="not a train.py checkpoint"):
        train.load_checkpoint(str(tmp_path / "other.pt"))
    other = train.parse_args(FAST + ["--lr", "5e-4"])
    with pytest.raises(SystemExit, match="lr: checkpoint 0.001 vs now 0.0005"):
        train.load_checkpoint(str(out / "ckpt.pt"), other)


# ----------------------------------------------------------------------------- 2 gloo processes

def _worker(rank, tmp):
    """Runs in each of 2 processes: a DDP run, an FSDP run, and one DDP gradient on fixed inputs."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2)
    flags = FAST + ["--backend", "ddp", "--steps", "2", "--micro-batch", "2", "--sample-every", "1000"]
    res = train.main(train.parse_args(flags + ["--out", f"{tmp}/ddp"]))       # accumulation 2, no_sync
    flat = torch.cat([p.detach().flatten() for p in res["model"].parameters()])
    both = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(both, flat)
    train.main(train.parse_args(flags + ["--out", f"{tmp}/fsdp", "--fsdp"]))
    # gradient of DDP on rank r's half of a fixed batch, t / eps / dropout from generator(100 + r)
    cfg = train.parse_args(FAST)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(train.build_model(cfg, train.build_encoder(cfg)))
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    cond = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    model(x[4 * rank:4 * rank + 4], cond[4 * rank:4 * rank + 4],
          generator=torch.Generator().manual_seed(100 + rank)).backward()
    if rank == 0:
        torch.save({"equal": torch.equal(both[0], both[1]),
                    "grads": {n: p.grad for n, p in model.module.named_parameters() if p.grad is not None}},
                   f"{tmp}/rank0.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_and_fsdp_on_two_gloo_processes(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)
    res = torch.load(tmp_path / "rank0.pt")
    assert res["equal"], "parameters differ between ranks after DDP training"
    # single process, the union of both ranks' batches with the same samples and the same noise
    cfg = train.parse_args(FAST)
    torch.manual_seed(0)
    model = train.build_model(cfg, train.build_encoder(cfg))
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    cond = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    loss = sum(model(x[4 * r:4 * r + 4], cond[4 * r:4 * r + 4], generator=torch.Generator().manual_seed(100 + r))
               for r in range(2)) / 2  # mean over the union of two equal halves
    loss.backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(res["grads"][n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    # FSDP2 wrote a full-state checkpoint that loads into an unsharded model and matches DDP training
    ddp, fsdp = (train.load_checkpoint(str(tmp_path / k / "ckpt.pt")) for k in ("ddp", "fsdp"))
    unsharded = train.build_model(cfg, train.build_encoder(cfg))
    unsharded.load_state_dict(fsdp["ema"])
    unsharded.load_state_dict(fsdp["model"])
    for k in ddp["model"]:
        torch.testing.assert_close(fsdp["model"][k], ddp["model"][k], rtol=1e-3, atol=1e-4, msg=k)
