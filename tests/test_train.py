"""train.py: the default job's code path, §6.1 recipe (Adam, EMA), exact resume, reshard, signals, closed pipes
(train.py, data.py, metrics.py), NaN stop, user errors (exit 2), conditioning cache, DDP and FSDP on gloo.

Expected values come from outside the code under test: hand-written Adam and EMA updates, the paper's
constants typed in here, a single-process gradient on the full batch, uninterrupted runs.
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import data
from machinery import runs
import semantica
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The default job (tiny-32, synthetic pages, random tiny encoder) shrunk to seconds.
FAST = ["--batch", "8", "--num-pages", "32", "--log-every", "1", "--sample-steps", "2", "--grid-images", "2",
        "--grid-n", "2", "--device", "cpu"]


def run(tmp, *flags):
    return train.main(train.parse_args(FAST + ["--out", str(tmp), *flags]))


def losses(result):
    return [loss for _, loss in result["losses"]]


def cli(*args, **kw):
    """train.py as a user runs it: -> CompletedProcess (text)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                          env=env, cwd=kw.get("cwd", ROOT), timeout=300)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return out, run(out, "--steps", "3", "--sample-every", "3")


def test_default_job_leaves_checkpoint_log_config_and_grid(tiny_run):
    out, result = tiny_run
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert {"step", "loss", "lr", "img_per_s", "eta_s", "grad_norm", "time", "elapsed_s"} <= set(log[0])
    assert log[0]["time"].endswith("+00:00")  # an ISO UTC timestamp
    assert json.load(open(out / "config.json"))["model"] == "tiny-32-p2"
    ckpt = runs.load_checkpoint(str(out / "ckpt.pt"))
    # the one checkpoint format (semantica.checkpoint_header)
    assert ckpt["format"] == "semantica-ckpt/2" and ckpt["step"] == 3 and ckpt["ema_decay"] == 0.99
    assert {"model_config", "p_uncond", "encoder", "model", "ema", "train_config", "optimizer"} <= set(ckpt)
    assert ckpt["encoder"]["name"] == "tiny" and ckpt["encoder"]["weights"].endswith(".pth")  # the toy encoder's file
    assert ckpt["data_position"] == 3 and ckpt["samples"] == 3 * 8
    written = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)     # the file, not the reader
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in [*written["model"], *written["optimizer"]["state"]])
    assert not any("encoder" in k for k in ckpt["model"])  # the frozen encoder is not part of the model state
    grid = Image.open(out / "variations_0000003.png")  # 2 rows x (condition + 2 variations) of 32 px
    assert grid.size == (3 * 34 + 2, 2 * 34 + 2)
    pytest.importorskip("matplotlib")
    assert Image.open(out / "loss.png").size[0] > 100


# ----------------------------------------------------------------------------- §6.1 recipe: EMA and Adam

def test_update_ema_is_a_lerp_towards_the_model_by_one_minus_decay():
    ema, model = torch.nn.BatchNorm1d(3).double(), torch.nn.BatchNorm1d(3).double()
    ema.weight.data.fill_(0.0)
    expected = np.zeros(3)
    for k, target in enumerate([1.0, 3.0, -2.0]):  # three steps, hand-computed ema = 0.9 ema + 0.1 model
        model.weight.data.fill_(target)
        model.running_mean.fill_(k + 5.0)
        semantica.update_ema(ema, model, 0.9)
        expected = 0.9 * expected + 0.1 * target
    assert expected[0] == pytest.approx(0.9 * (0.9 * 0.1 + 0.3) - 0.2)
    torch.testing.assert_close(ema.weight.data, torch.tensor(expected), rtol=1e-12, atol=0)
    torch.testing.assert_close(ema.running_mean, torch.full((3,), 7.0, dtype=torch.float64))  # buffers copied


def test_the_loop_updates_the_ema_once_per_step_from_the_initial_weights(tmp_path):
    result = run(tmp_path, "--steps", "1", "--sample-every", "1000")
    cfg = train.parse_args(FAST)
    torch.manual_seed(cfg.seed)  # the initial weights, rebuilt as main builds them
    init = train.build_model(cfg, train.load_frozen_encoder(cfg)).state_dict()
    model, ema = result["model"].state_dict(), result["ema"].state_dict()
    step = torch.cat([(model[k] - init[k]).double().flatten() for k in init])
    moved = torch.cat([(ema[k] - init[k]).double().flatten() for k in init])
    assert step.norm() > 0
    # one Polyak step with the tiny preset's decay 0.99: ema - init = (1 - 0.99) (model - init)
    assert (moved - 0.01 * step).norm() / (0.01 * step).norm() < 0.05


def test_adam_has_the_constants_of_section_6_1():
    cfg = train.parse_args(["--res", "256"])  # the §6.1 baseline preset
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = train.make_optimizer(cfg, [p], torch.device("cpu"))
    lr, b1, b2, eps = 2e-4, 0.9, 0.99, 1e-12  # §6.1, typed in from the paper
    m = v = np.zeros(3)
    x = np.zeros(3)
    for t, g in enumerate([np.array([1e-9, -1e-6, 1.0]), np.array([3e-9, 2e-6, -0.5])], start=1):
        p.grad = torch.tensor(g)
        opt.step()
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g  # Kingma & Ba, Algorithm 1
        x = x - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    np.testing.assert_allclose(p.detach().numpy(), x, rtol=1e-9, atol=0)


def test_the_loop_trains_with_that_adam(tiny_run):
    group = tiny_run[1]["optimizer"].param_groups[0]
    assert isinstance(tiny_run[1]["optimizer"], torch.optim.Adam)
    assert (group["betas"], group["eps"], group["lr"]) == ((0.9, 0.99), 1e-12, 1e-3)  # lr: the tiny preset's


# ----------------------------------------------------------------------------- resume, seeds, signals

def test_resume_continues_the_uninterrupted_loss_sequence_and_truncates_the_log(tmp_path):
    full = run(tmp_path / "a", "--steps", "4")
    run(tmp_path / "b", "--steps", "2")
    with open(tmp_path / "b" / "log.jsonl", "a") as f:  # a crash after logging step 3, before its checkpoint
        f.write(json.dumps({"step": 3, "loss": 123.0}) + "\n")
    resumed = run(tmp_path / "b", "--steps", "4", "--resume")
    assert [s for s, _ in resumed["losses"]] == [3, 4]
    torch.testing.assert_close(losses(resumed), losses(full)[2:], rtol=1e-6, atol=0)
    log = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and 123.0 not in [r["loss"] for r in log]


def test_a_checkpoint_with_wrapper_prefixes_resumes_identically(tmp_path):
    """A checkpoint whose model, EMA and optimiser keys carry "_orig_mod.module." (a compiled DDP model's
    names, saved by other code) resumes by the one key rule of every file read: the uninterrupted losses."""
    full = run(tmp_path / "a", "--steps", "4")
    run(tmp_path / "b", "--steps", "2")
    path = tmp_path / "b" / "ckpt.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    wrap = lambda sd: {"_orig_mod.module." + k: v for k, v in sd.items()}   # noqa: E731
    opt = ckpt["optimizer"]
    torch.save({**ckpt, "model": wrap(ckpt["model"]), "ema": wrap(ckpt["ema"]),
                "optimizer": {"state": wrap(opt["state"]), "param_groups": [
                    {**g, "params": ["_orig_mod.module." + p for p in g["params"]]} for g in opt["param_groups"]]}}, path)
    resumed = run(tmp_path / "b", "--steps", "4", "--resume")
    assert losses(resumed) == losses(full)[2:]                            # steps 3 and 4, bit for bit


def test_a_stop_between_log_steps_resumes_to_the_uninterrupted_log(tmp_path, monkeypatch):
    """SIGTERM at step 3 of a run logging every 2 steps: the stop logs its partial window (step 3); --resume
    replaces that row, and log.jsonl then holds the rows of an uninterrupted run (steps 2 and 4, the loss of
    step 4 the mean of steps 3 and 4), not a row at 3 and a one-step mean at 4."""
    flags = ("--steps", "4", "--log-every", "2", "--ckpt-every", "100", "--sample-every", "100")
    full = run(tmp_path / "a", *flags)
    stop_at_3 = lambda stop, d, step, cfg: step == 3   # noqa: E731  (a signal arriving during step 3)
    monkeypatch.setattr(train.backends, "poll_stop", stop_at_3)
    stopped = run(tmp_path / "b", *flags)
    assert stopped["step"] == 3 and [s for s, _ in stopped["losses"]] == [2, 3]
    monkeypatch.undo()
    resumed = run(tmp_path / "b", *flags, "--resume")
    log = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
    assert [r["step"] for r in log] == [2, 4] == [s for s, _ in full["losses"]]
    assert [r["loss"] for r in log] == losses(full)                  # same steps, same sums: bit-identical
    assert losses(resumed) == losses(full)[1:]


def test_micro_step_seeds_are_distinct_for_any_accumulation_world_and_step():
    accum, world, steps = 130, 3, 4  # accumulation > 64: the old (... + step) * 64 + k collided here
    seeds = [train.micro_step_seed(0, r, s, k) for r in range(world) for s in range(steps) for k in range(accum)]
    assert len(set(seeds)) == len(seeds)
    assert train.micro_step_seed(0, 0, 0, 64) != train.micro_step_seed(0, 0, 1, 0)
    assert all(0 <= s < 2 ** 63 for s in seeds)  # valid for torch.manual_seed and XLA
    assert train.micro_step_seed(1, 0, 0, 0) != train.micro_step_seed(0, 0, 0, 0)


def test_grad_checkpoint_recomputes_the_same_losses(tmp_path):
    flags = ("--steps", "2", "--grid-images", "1", "--sample-steps", "1")
    plain = run(tmp_path / "a", *flags)
    recomputed = run(tmp_path / "b", *flags, "--grad-checkpoint")
    assert [s for s, _ in recomputed["losses"]] == [s for s, _ in plain["losses"]] == [1, 2]
    torch.testing.assert_close(losses(recomputed), losses(plain), rtol=1e-6, atol=0)


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    log = tmp_path / "log.jsonl"

    def kill_when_training():  # the handler is installed before the first log record is written
        while not log.exists() or not log.read_text():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=kill_when_training, daemon=True).start()
    result = run(tmp_path, "--steps", "1000", "--ckpt-every", "1000", "--sample-every", "1000")
    assert result["step"] < 1000 and result["stopped_by"] == signal.SIGTERM
    assert runs.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == result["step"]
    assert signal.getsignal(signal.SIGTERM) is not None  # handlers restored afterwards


def test_closed_pipe_then_ctrl_c_still_saves(tmp_path):
    """`python train.py | tee log`, then Ctrl-C: tee dies first, the run must neither crash nor lose work."""
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *FAST, "--out", str(tmp_path),
                          "--steps", "1000", "--ckpt-every", "1000", "--sample-every", "1000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    while not p.stdout.readline().startswith("step "):  # training has started
        pass
    p.stdout.close()  # the reader is gone: further prints hit a closed pipe
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    err = p.stderr.read()
    assert p.wait(timeout=120) == 128 + signal.SIGINT, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    step = runs.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"]
    assert 1 <= step < 1000
    assert json.loads(open(tmp_path / "log.jsonl").readlines()[-1])["step"] == step


def closed_pipe_run(*args):
    """`python ARGS 2>&1 | head -0`: stdout and stderr go to one pipe whose reader is gone before the first
    write (a killed `tee` is the same from its next write on) -> exit status."""
    p = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    p.stdout.close()
    return p.wait(timeout=300)


def test_a_closed_stdout_and_stderr_pipe_costs_no_checkpoint(tmp_path):
    """Training, its prints and its progress bar on a vanished reader: the run ends normally (status 0) with
    the checkpoint of its last step, the log of every step and the end-of-run files."""
    assert closed_pipe_run("train.py", *FAST, "--steps", "2", "--out", str(tmp_path)) == 0
    assert runs.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 2
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")] == [1, 2]
    assert (tmp_path / "variations_0000002.png").exists()


@pytest.mark.parametrize("command", ["data", "metrics"])
def test_data_and_metrics_commands_survive_a_closed_pipe(tmp_path, command):
    """data.py encode (progress bar, then a JSON line) and metrics.py (a JSON report) with stdout and stderr on
    a vanished reader: status 0 and the cache complete (meta.json is written last)."""
    if command == "data":
        args = ["data.py", "encode", "synthetic", str(tmp_path / "cache"), "--encoder", "tiny", "--random-encoder",
                "--image-size", "32", "--pages", "4"]
    else:
        for name in ("real", "fake"):
            np.save(tmp_path / f"{name}.npy", np.random.default_rng(len(name)).normal(size=(8, 3)))
        args = ["metrics.py", str(tmp_path / "real.npy"), str(tmp_path / "fake.npy")]
    assert closed_pipe_run(*args) == 0
    assert command != "data" or (tmp_path / "cache" / "meta.json").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        run(tmp_path, "--steps", "6", "--ckpt-every", "1", "--lr", "1e30")  # parameters explode after step 1
    step = runs.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"]
    assert 1 <= step < 6


# ----------------------------------------------------------------------------- flags and user errors

def test_presets_flags_and_help_from_the_config_comments(capsys, tmp_path):
    cfg = train.parse_args(["--res", "256"])
    assert (cfg.model, cfg.encoder, cfg.batch, cfg.lr, cfg.ema_decay) == ("sid-b-256", "dinov2-b14", 2048, 2e-4, 0.9999)
    assert train.parse_args(["--res", "256", "--lr", "1e-3"]).lr == 1e-3  # explicit flags beat the preset
    assert cfg.sigmoid_bias is None and train.parse_args([]).sigmoid_bias == -1.0   # §3.1's loss; the CPU job's weighting
    assert train.parse_args(["--sigmoid-bias", "none"]).sigmoid_bias is None     # the CPU job with the paper's loss
    job = train.parse_args([])
    assert (job.toy_encoder, job.random_encoder, job.model) == (True, False, "tiny-32-p2")   # the default job's encoder
    for flags in (["--encoder", "dinov2-s14"], ["--encoder-weights", "x.pth"], ["--random-encoder"]):
        assert not train.parse_args(flags).toy_encoder, flags  # the preset trains its own tiny encoder only
    assert not train.parse_args(["--encoder", "dinov2-s14"]).random_encoder  # not a random DINOv2 without a word
    assert train.parse_args(["--encoder", "dinov2-s14", "--random-encoder"]).random_encoder
    with pytest.raises(runs.UserError, match="--toy-encoder trains --encoder tiny itself"):
        runs.check_paths(train.parse_args(["--toy-encoder", "--encoder", "dinov2-s14", "--out", str(tmp_path / "r")]))
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Adam beta2 (§6.1) (default: 0.99)" in text
    assert "cpu, cuda or cuda:N" in text and "default: only" not in text
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--device", "gpu0"])
    assert e.value.code == 2 and "--device" in capsys.readouterr().err
    with pytest.raises(train.UserError, match="divisible"):
        train.batch_plan(train.parse_args(["--batch", "10", "--micro-batch", "4"]), world=1)


@pytest.mark.parametrize("encoder, low, high", [("dinov2-b14", 0.3, 0.9), ("siglip-b16-256", 0.65, None)])
def test_filter_band_defaults_to_the_encoders_appendix_c_values(encoder, low, high):
    cfg = train.filter_band(train.parse_args(["--res", "256", "--encoder", encoder]))
    assert cfg.filter_low == low and (high is None or cfg.filter_high == high)
    given = train.filter_band(train.parse_args(["--res", "256", "--encoder", encoder, "--filter-low", "0.5"]))
    assert given.filter_low == 0.5 and given.filter_high == cfg.filter_high


@pytest.mark.parametrize("flags, message", [
    (["--data", "/no/such/folder"], "--data /no/such/folder"),
    (["--res", "256"], "--encoder-weights"),
    (["--encoder", "dinov2-s14"], "--encoder-weights"),     # the 32 px preset allows its own random encoder only
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--resume"], "CUDA is not available|--resume"),
    (["--resume"], "no checkpoint"),
    (["--data", "EMPTY"], "no images under"),                       # found once the data is read, after --out's check
    (["--num-pages", "0"], "no training items"),
])
def test_user_errors_are_one_line_with_exit_status_2(tmp_path, flags, message):
    (tmp_path / "empty").mkdir()
    r = cli("--out", str(tmp_path / "new" / "run"), *[str(tmp_path / "empty") if f == "EMPTY" else f for f in flags])
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("train.py: error:"), r.stderr
    assert any(m in r.stderr for m in message.split("|")), r.stderr
    assert not (tmp_path / "new").exists()  # refused before any work: no folder left behind, not even an empty one


def test_existing_run_needs_resume_or_a_new_folder(tiny_run, tmp_path):
    out, _ = tiny_run
    before = (out / "ckpt.pt").stat().st_mtime_ns
    r = cli(*FAST, "--out", str(out), "--steps", "1")
    assert r.returncode == 2 and "--resume" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert (out / "ckpt.pt").stat().st_mtime_ns == before  # the later checkpoint is left alone
    with pytest.raises(train.UserError, match="no checkpoint"):
        run(tmp_path / "empty", "--resume")
    with pytest.raises(train.UserError, match="--reshard only applies"):
        run(tmp_path / "x", "--reshard")
    if importlib.util.find_spec("tensorboard") is None:  # the optional extra is absent here
        with pytest.raises(train.UserError, match="pip install tensorboard"):
            run(tmp_path / "tb", "--tensorboard")


def test_tensorboard_gets_the_logged_scalars_and_grids(tmp_path):
    pytest.importorskip("tensorboard")  # optional extra [tensorboard]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    result = run(tmp_path, "--steps", "2", "--sample-every", "2", "--tensorboard")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/img_per_s"} <= set(events.Tags()["scalars"])
    assert events.Tags()["images"] == ["variations"]
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in logged] == [1, 2]
    torch.testing.assert_close([v for _, v in logged], losses(result), rtol=1e-6, atol=0)


def test_bad_checkpoints_give_clear_errors(tmp_path, tiny_run):
    out, _ = tiny_run
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(train.UserError, match="not a readable") as e:
        runs.load_checkpoint(str(tmp_path / "junk.pt"))
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)   # one line, no unsafe advice
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(train.UserError, match="not a resumable train.py checkpoint"):
        runs.load_checkpoint(str(tmp_path / "other.pt"))
    other = train.parse_args(FAST + ["--lr", "5e-4"])
    with pytest.raises(train.UserError, match="lr: checkpoint 0.001 vs now 0.0005"):
        runs.load_checkpoint(str(out / "ckpt.pt"), other)


# ----------------------------------------------------------------------------- precomputed conditioning (§3.2)

def test_conditioning_cache_gives_the_on_the_fly_losses(tmp_path):
    cfg = train.parse_args(FAST)
    pages, _ = data.open_pages("synthetic", 32, num_pages=cfg.num_pages, seed=cfg.seed)
    cache = data.encode_cache(pages, train.load_frozen_encoder(cfg), str(tmp_path / "cond"))  # python data.py encode
    flags = ("--steps", "3", "--sample-every", "3")
    fly, cached = run(tmp_path / "a", *flags, "--cond-cache", ""), run(tmp_path / "b", *flags, "--cond-cache", cache)
    # float16 storage of the tokens is the only difference
    torch.testing.assert_close(losses(cached), losses(fly), rtol=2e-3, atol=0)
    a, b = fly["model"].state_dict(), cached["model"].state_dict()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    # the cache was really used: the weights differ (Adam's first steps move weights by ~lr whatever the
    # gradient's size, so a float16-rounded gradient may flip a weight's direction: up to a few lr = 1e-3)
    assert 0 < diff < 1e-2


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
    model = torch.nn.parallel.DistributedDataParallel(train.build_model(cfg, train.load_frozen_encoder(cfg)))
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
def test_ddp_fsdp_and_reshard_on_two_gloo_processes(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)
    res = torch.load(tmp_path / "rank0.pt")
    assert res["equal"], "parameters differ between ranks after DDP training"
    # single process, the union of both ranks' batches with the same samples and the same noise
    cfg = train.parse_args(FAST)
    torch.manual_seed(0)
    model = train.build_model(cfg, train.load_frozen_encoder(cfg))
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    cond = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    loss = sum(model(x[4 * r:4 * r + 4], cond[4 * r:4 * r + 4], generator=torch.Generator().manual_seed(100 + r))
               for r in range(2)) / 2  # mean over the union of two equal halves
    loss.backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(res["grads"][n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    # FSDP2 wrote a full-state checkpoint that loads into an unsharded model and matches DDP training
    ddp, fsdp = (runs.load_checkpoint(str(tmp_path / k / "ckpt.pt")) for k in ("ddp", "fsdp"))
    unsharded = train.build_model(cfg, train.load_frozen_encoder(cfg))
    unsharded.load_state_dict(fsdp["ema"])
    unsharded.load_state_dict(fsdp["model"])
    for k in ddp["model"]:
        torch.testing.assert_close(fsdp["model"][k], ddp["model"][k], rtol=1e-3, atol=1e-4, msg=k)

    # Resume the 2-process run in one process: refused without --reshard, continued with it.
    flags = ["--backend", "single", "--steps", "3", "--micro-batch", "2", "--sample-every", "1000", "--resume"]
    with pytest.raises(train.UserError, match="--reshard"):
        run(tmp_path / "ddp", *flags)
    one = run(tmp_path / "ddp", *flags, "--reshard")
    assert [s for s, _ in one["losses"]] == [3] and np.isfinite(losses(one)[0])
    after = runs.load_checkpoint(str(tmp_path / "ddp" / "ckpt.pt"))
    assert after["world"] == 1 and after["step"] == 3 and after["samples"] == 3 * 8
    assert after["data_position"] == 3 * 4  # accumulation recomputed: 8 = 2 x 4 x 1 (was 2 x 2 x 2)
    state = after["optimizer"]["state"]
    assert all(int(s["step"]) == 3 for s in state.values())  # Adam's step count continued, not restarted
    # the EMA was restored, then moved once: ema3 = 0.99 ema2 + 0.01 model3 (not re-initialised)
    for k in ddp["ema"]:
        expected = 0.99 * ddp["ema"][k].double() + 0.01 * after["model"][k].double()
        torch.testing.assert_close(after["ema"][k].double(), expected, rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("flags", [["--guidance", "nan"], ["--guidance", "inf"], ["--lr", "nan"], ["--lr", "0"],
                                   ["--steps", "0"], ["--log-every", "0"], ["--ckpt-every", "0"],
                                   ["--sample-every", "0"], ["--p-uncond", "1.5"], ["--ema-decay", "2"],
                                   ["--batch", "0"], ["--max-pixels", "-5"], ["--seed", str(2 ** 63)]])
def test_numbers_nothing_can_be_computed_with_are_parse_errors(flags, capsys):
    """Refused when parsed (exit 2, one line naming the flag), before any folder is made or step is run:
    a nan guidance used to train and then crash on the final grid without a checkpoint."""
    with pytest.raises(SystemExit) as e:
        train.parse_args(flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and flags[0] in err[-1]


def test_resume_on_other_synthetic_pages_is_refused(tmp_path, monkeypatch, capsys):
    """The checkpoint records the synthetic pages it was trained on (seed, count, drawing style): a resume
    after the style changed is one UserError, with the checkpoint untouched; a checkpoint without the
    record (older runs) resumes with a warning."""
    from pages import synthetic
    run(tmp_path, "--steps", "1", "--sample-every", "100")
    path = tmp_path / "ckpt.pt"
    ckpt = runs.load_checkpoint(str(path))
    assert ckpt["train_pages"] == synthetic.SyntheticPages(32, 32, seed=0).fingerprint()
    before = path.read_bytes()
    monkeypatch.setattr(synthetic.SyntheticPages.__init__, "__defaults__",
                        synthetic.SyntheticPages.__init__.__defaults__[:-2] + (1.0, 180.0))   # free pose
    cond = {f: os.path.getmtime(tmp_path / "cond" / f) for f in os.listdir(tmp_path / "cond")}
    with pytest.raises(train.UserError, match="other synthetic pages"):
        run(tmp_path, "--steps", "2", "--resume", "--sample-every", "100")
    assert path.read_bytes() == before
    assert {f: os.path.getmtime(tmp_path / "cond" / f) for f in os.listdir(tmp_path / "cond")} == cond  # not re-encoded
    monkeypatch.undo()
    state = torch.load(path, map_location="cpu", weights_only=True)   # not mmapped: the file is rewritten
    del state["train_pages"]                              # as written before the record existed
    torch.save(state, path)
    capsys.readouterr()
    assert run(tmp_path, "--steps", "2", "--resume", "--sample-every", "100")["step"] == 2
    assert "does not record its synthetic pages" in capsys.readouterr().out


def test_the_default_job_conditions_on_the_toy_encoder_through_a_cond_cache_it_encodes_once(tmp_path, monkeypatch):
    """The 32 px preset: the committed toy encoder (weights/), every training image encoded once into OUT/cond
    (§3.2), the cached tokens being that encoder's on those images (float16), and a resumed run reusing them."""
    import encoders
    from pages import embeddings, synthetic
    calls = []
    real = embeddings.encode_cache
    monkeypatch.setattr(data, "encode_cache", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    flags = ["--batch", "8", "--num-pages", "6", "--sample-steps", "2", "--grid-images", "2", "--grid-n", "2",
             "--device", "cpu", "--out", str(tmp_path)]
    result = train.main(train.parse_args(flags + ["--steps", "2"]))
    assert result["step"] == 2 and len(calls) == 1
    identity = runs.load_checkpoint(str(tmp_path / "ckpt.pt"))["encoder"]
    assert os.path.dirname(identity["weights"]) == os.path.join(ROOT, "weights") and "state" not in identity
    enc = encoders.load_encoder("tiny", weights=identity["weights"])
    cache = data.CondCache.open(str(tmp_path / "cond"), synthetic.SyntheticPages(6, 32, seed=0), enc)
    x = synthetic.SyntheticPages(6, 32, seed=0).image(2, 1)[None]
    want = enc(enc.preprocess(x))[1][0]
    row = sum(synthetic.SyntheticPages(6, 32, seed=0).count(p) for p in range(2)) + 1
    got = torch.from_numpy(np.array(cache.arrays()["tokens"][row])).float()
    assert torch.allclose(got, want, atol=2e-3 * want.abs().max().item())        # float16 storage
    train.main(train.parse_args(flags + ["--steps", "3", "--resume"]))
    assert len(calls) == 1                                                       # reused, not re-encoded
    with pytest.raises(runs.UserError, match="page shards carry their"):
        train.main(train.parse_args(flags + ["--data", str(tmp_path / "{000000..000001}.tar"), "--cond-cache", "encode",
                                             "--out", str(tmp_path / "s")]))
    assert train.parse_args(["--data", "d/{000000..000001}.tar"]).cond_cache == ""   # the preset's, not for shards


def test_select_pairs_draws_every_pair_of_a_page_through_the_filters_selection(tmp_path, monkeypatch):
    """App. C's unfiltered arm differs from the filtered one by the band only: with --select-pairs and the band
    [-1, 1] the dataset draws uniformly from every ordered pair (page, i, j), i != j, so a page with n images
    weighs n (n - 1), as the kept pairs of a filtered run weigh it; without the flag it draws pages uniformly."""
    from pages import synthetic
    seen = []
    real = data.PagePairs
    monkeypatch.setattr(data, "PagePairs", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    flags = ["--batch", "4", "--num-pages", "6", "--sample-steps", "1", "--grid-images", "1", "--grid-n", "1",
             "--device", "cpu", "--steps", "1", "--filter-low", "-1", "--filter-high", "1"]
    train.main(train.parse_args(flags + ["--out", str(tmp_path / "a"), "--select-pairs"]))
    pages = synthetic.SyntheticPages(6, 32, seed=0)
    want = {(p, i, j) for p in range(6) for i in range(pages.count(p)) for j in range(pages.count(p)) if i != j}
    got = [tuple(r) for r in seen[-1]["pairs"].tolist()]
    assert len(got) == len(want) == sum(pages.count(p) * (pages.count(p) - 1) for p in range(6)) and set(got) == want
    train.main(train.parse_args(flags + ["--out", str(tmp_path / "b")]))
    assert seen[-1]["pairs"] is None
    for bad in (["--pairs", "same"], ["--data", str(tmp_path / "{000000..000001}.tar"), "--cond-cache", ""]):
        with pytest.raises(runs.UserError, match="--select-pairs"):
            train.main(train.parse_args(flags + ["--out", str(tmp_path / "c"), "--select-pairs", *bad]))


def test_the_loop_weights_its_loss_as_sigmoid_bias_says(tmp_path, monkeypatch):
    """The 32 px preset trains with the sigmoid-weighted eps loss (b = -1); --sigmoid-bias none restores §3.1's."""
    import diffusion
    seen, real = [], diffusion.diffusion_loss
    monkeypatch.setattr(diffusion, "diffusion_loss", lambda *a, **kw: seen.append(kw["sigmoid_bias"]) or real(*a, **kw))
    run(tmp_path / "a", "--steps", "2")
    run(tmp_path / "b", "--steps", "1", "--sigmoid-bias", "none")
    assert seen == [-1.0, -1.0, None]
