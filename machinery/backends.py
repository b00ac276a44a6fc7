"""The distributed backends of train.py (and sample.py's set-up): one process, torchrun DDP / FSDP2 (GPUs;
gloo on CPU), torch_xla (TPUs).

Machinery, not the paper: Semantica trains on 256 TPUv3 chips (§6.1) with a global batch of 2048; this module
holds what differs between backends so that train.py's loop reads as the single-device recipe. Each function
takes the `Dist` of this process and does the backend's thing: setup (device, rank, world), wrapping (DDP,
FSDP2 sharding per U-ViT block), gradient sync and reduction, means and agreement over ranks, the full state
dict of a sharded model, atomic checkpoint writes. References: facebookresearch/DiT train.py @ed81ce2,
karpathy/nanoGPT train.py @3adf61e.
torch_xla is optional and imported inside the xla_* functions (below the general ones); on XLA:CPU with
several devices its collectives take another route (xla_reduce, scripts/xla_cpu_collectives.py).
Not implemented: SPMD on TPU, multi-host torch_xla, pipeline/tensor parallelism.
"""
import contextlib
import datetime
import os
import signal
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard

import semantica
import uvit


@dataclass
class Dist:
    kind: str          # "single" | "ddp" | "xla"
    rank: int
    world: int
    local_rank: int
    device: torch.device
    is_main: bool


def setup_distributed(device="", backend="auto"):
    """One process, torchrun (NCCL on GPUs, gloo on CPU) or a torch_xla replica -> Dist. device: "", cpu, cuda
    or cuda:N ("": cuda when available); cuda without an index is the local rank's GPU. backend: auto (ddp
    under torchrun, else single), single, ddp or xla."""
    kind = backend if backend != "auto" else ("ddp" if "RANK" in os.environ else "single")
    if kind == "xla":
        return xla_setup()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = device.startswith("cuda") or (not device and torch.cuda.is_available())
    device = torch.device(device if ":" in device else f"cuda:{local_rank}") if cuda else torch.device(device or "cpu")
    if cuda:
        torch.cuda.set_device(device)  # LOCAL_RANK, never the global rank (DiT #79)
    if kind == "single":
        return Dist("single", 0, 1, 0, device, True)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    return Dist("ddp", rank, world, local_rank, device, rank == 0)


def cuda_speedups(d):
    """CUDA: TF32 matmuls and convolutions (faster; may shift metrics slightly), cuDNN autotuning (fixed shapes)."""
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest conv kernels


def build_lock(d):
    """Context of building the model: XLA replica threads share torch's global RNG, so they seed and build one
    at a time (the same init in each); other backends: nothing."""
    return XLA_BUILD_LOCK if d.kind == "xla" else contextlib.nullcontext()


def seed_micro_step(gen, seed, d):
    """Seed the draws of one micro-step: t, eps and condition dropout (gen), dropout layers (global RNG)."""
    if d.kind == "xla":
        return xla_seed(seed)
    gen.manual_seed(seed)
    torch.manual_seed(seed)


def wrap(raw, ema, cfg, d):
    """The module the loop calls: DDP (gradient all-reduce), FSDP2 (sharded) or `raw` itself (single, XLA)."""
    if cfg.compile:
        raw.net.compile()  # in place: state_dict keys keep their names (no "_orig_mod.")
    if d.kind == "xla":
        return xla_wrap(raw, ema)
    if cfg.fsdp:
        for m in (raw, ema):  # the same sharding for both, so the EMA lerp stays shard-local
            for block in m.net.modules():  # one FSDP unit per block, then the rest at the root
                if isinstance(block, (uvit.ResBlock, uvit.TransformerBlock)):
                    fully_shard(block)
            fully_shard(m)
        return raw
    if d.kind == "ddp":
        return torch.nn.parallel.DistributedDataParallel(raw, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    return raw


def grad_sync(model, cfg, d, last):
    """Context of one micro-step: gradients are reduced across ranks on the last micro-step only."""
    if cfg.fsdp:
        model.set_requires_gradient_sync(last)  # FSDP2: reduce-scatter on the last micro-step
        return contextlib.nullcontext()
    return model.no_sync() if d.kind == "ddp" and not last else contextlib.nullcontext()


def reduce_gradients(opt, d):
    """XLA: average the gradients over replicas now (DDP / FSDP already did, in backward)."""
    if d.kind == "xla":
        xla_reduce_gradients(opt)


def optimizer_step(opt, d):
    """Adam step on the reduced gradients, then clear them."""
    opt.step()
    opt.zero_grad(set_to_none=True)


def mean_over_ranks(value, d):
    """The mean of a device scalar over ranks (DDP / XLA all-reduce); one process as is."""
    if d.kind == "xla" and d.world > 1:
        return xla_mean(value, d)
    if d.kind == "ddp":
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value = value / d.world
    return value


def poll_stop(stop, d, step, cfg):
    """Whether to stop now after a SIGTERM/SIGINT; DDP/XLA ranks agree (polled every 10 steps, a host sync)."""
    if d.kind == "xla" and d.world > 1:
        return xla_poll_stop(stop, step, cfg)
    if d.kind != "ddp":
        return bool(stop)
    if step % 10 and step != cfg.steps:
        return False
    flag = torch.tensor(float(bool(stop)), device=d.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0


def barrier(d):
    if d.kind == "ddp":
        dist.barrier()


def grad_norm(raw):
    """Global L2 norm of the (reduced) gradients, a device scalar; FSDP2 shards are gathered."""
    norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), float("inf"))  # max_norm inf: measures only
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def full_states(model, ema, opt, d):
    """(model, EMA, optimiser) state dicts, full and on CPU, from any backend: FQN keys without "module." /
    "_orig_mod." prefixes; FSDP2 shards gathered (a collective: every rank calls this)."""
    if d.kind == "xla":
        return model.state_dict(), ema.state_dict(), opt.state_dict()
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=full), get_model_state_dict(ema, options=full),
            get_optimizer_state_dict(model, opt, options=full))


def save_checkpoint(path, state, d):
    """Write atomically (tmp + os.replace) from rank 0, then all ranks meet (XLA: every replica saves)."""
    if d.kind == "xla":
        return xla_save(state, path, d)
    if d.is_main:
        semantica.save_checkpoint(path, state)
    barrier(d)


def load_optimizer(model, opt, state, d):
    """Restore a full (unsharded) optimiser state into this run's optimiser: plain, DDP or FSDP2 (any world)."""
    if d.kind == "xla":
        return opt.load_state_dict(state)
    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))


# ----------------------------------------------------------------------------- torch_xla (optional)

def xla_launch(main, cfg, stop):
    """Run main(cfg) in every torch_xla replica (torch_xla.launch: one process per TPU chip, or one for the
    CPU devices of PJRT_DEVICE=CPU, and one thread per device) -> dict(stopped_by).

    Signals reach a process's main thread only, and the replicas run in worker threads of child processes.
    So the handlers are installed here, in the launching process, and the children are forked: they inherit
    the handlers, which run in their main thread (waiting for the replica threads) and fill `stop` (runs.STOP),
    polled by the loop. A signal to this process only (a scheduler's SIGTERM) is forwarded to the children.
    """
    import multiprocessing
    import torch_xla

    def forward(sig, frame):
        stop.append(sig)
        for child in multiprocessing.active_children():  # none inside a child
            os.kill(child.pid, sig)

    # DESIGN: on TPU a persistent compilation cache under OUT, so a resumed run (after a preemption) does not
    # recompile the step (minutes to half an hour for large models); set
    # XLA_PERSISTENT_CACHE_PATH to share one between runs. XLA:CPU cannot load one ("Deserializing serialized
    # executable not supported"), so none there. UNTESTED on TPU.
    if os.environ.get("PJRT_DEVICE") == "TPU":
        os.environ.setdefault("XLA_PERSISTENT_CACHE_PATH", os.path.join(os.path.abspath(cfg.out), "xla_cache"))
    stop.clear()
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:  # fork, not torch_xla's default spawn: a spawned child would not inherit the handlers
        torch_xla.launch(_xla_main, args=(main, cfg), start_method="fork")
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return dict(stopped_by=stop[0] if stop else None)


def _xla_main(index, main, cfg):
    main(cfg)  # the return value would be pickled back to the launching process: drop it


def xla_setup():
    """Rank, world and device of this torch_xla replica (called inside torch_xla.launch's function)."""
    import torch_xla
    import torch_xla.runtime as xr
    rank, world = xr.global_ordinal(), xr.world_size()
    return Dist("xla", rank, world, xr.local_ordinal(), torch_xla.device(), rank == 0)


# XLA:CPU only (see xla_reduce): one channel id per call site, and a barrier shared by the replica threads.
XLA_CHANNELS = {"broadcast": 1, "grads": 2, "loss": 3, "stop": 4, "barrier": 5}
XLA_CPU_BARRIER, XLA_CPU_BARRIER_LOCK = [], threading.Lock()
XLA_BUILD_LOCK = threading.Lock()  # replica threads share torch's global RNG: seed + build one at a time


@torch.no_grad()
def xla_reduce(tensors, op, channel):
    """In place over the replicas: op "mean" (the average), "max", or "first" (replica 0's values); one
    replica: nothing. On TPU: xm.all_reduce / xm.collective_broadcast, the usual torch_xla collectives.

    DESIGN: XLA:CPU with several devices (CPU_NUM_DEVICES=2, the tests: one thread per device in one
    process) needs another route; scripts/xla_cpu_collectives.py shows both problems.
    1. torch_xla compiles one executable per device, and XLA:CPU pairs the replicas of a collective by its
       channel id or, without one, by the id of the compiled HLO module, which differs between the two
       compilations. xm.all_reduce (and what is built on it: optimizer_step, broadcast_master_param,
       rendezvous, mesh_reduce) sets no channel id, so each replica waits under its own key until XLA aborts
       the process (torch_xla/csrc/cross_replica_reduces.cpp BuildAllReduce: channel_id=nullopt;
       scripts/xla_cpu_collectives.py reproduces it). An
       xm.all_gather with an explicit channel id is paired: the (float) tensors go as one flat float32 vector,
       gathered from every replica (world x its size: fine for tests), reduced here in replica order, so
       every replica computes bit-identical results.
    2. XLA:CPU aborts a collective whose replicas arrive more than 10 s apart (in-process collectives'
       fixed terminate timeout), and each replica compiles its graphs at its own pace (minutes for the step).
       So the collective runs as a small graph of its own, entered by all replica threads together.
    """
    import torch_xla
    import torch_xla.core.xla_model as xm
    import torch_xla.runtime as xr
    world = xr.world_size()
    if world == 1 or not tensors:
        return
    if xr.device_type() != "CPU":
        if op == "first":
            return xm.collective_broadcast(tensors)
        return xm.all_reduce(xm.REDUCE_MAX if op == "max" else xm.REDUCE_SUM, tensors,
                             scale=1.0 / world if op == "mean" else 1.0)
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    torch_xla.sync()  # the graph so far, up to `flat`, runs without the collective
    xm.wait_device_ops()  # and has finished on every replica when the barrier opens
    with XLA_CPU_BARRIER_LOCK:  # made by the first replica thread that gets here
        if not XLA_CPU_BARRIER:
            XLA_CPU_BARRIER.append(threading.Barrier(world))
    XLA_CPU_BARRIER[0].wait(timeout=1800)  # a replica that died: BrokenBarrierError, not a hang forever
    every = xm.all_gather(flat[None], dim=0, groups=[list(range(world))], pin_layout=False, channel_id=channel,
                          use_global_device_ids=True)  # (world, N): row r from replica r
    torch_xla.sync()  # the collective alone: a tiny graph, compiled in well under 10 s
    flat = {"mean": lambda: every.sum(0) / world, "max": lambda: every.amax(0), "first": lambda: every[0]}[op]()
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def xla_wrap(raw, ema):
    """No wrapper on XLA. Replica threads of one process (TPU v2/v3 cores, XLA:CPU devices) share the global
    RNG, so their initialisations interleave: every replica takes replica 0's model and EMA."""
    import torch_xla
    xla_reduce([*raw.parameters(), *raw.buffers(), *ema.parameters(), *ema.buffers()], "first",
               XLA_CHANNELS["broadcast"])
    torch_xla.sync()
    return raw


def xla_seed(seed):
    import torch_xla.core.xla_model as xm
    xm.set_rng_state(seed)


def xla_reduce_gradients(opt):
    """xm.reduce_gradients(opt) spelled out: gradients averaged over the replicas (DDP does this inside
    backward). Through xla_reduce, so XLA:CPU's replicas meet too."""
    grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
    xla_reduce(grads, "mean", XLA_CHANNELS["grads"])


def xla_loader(loader, d):
    import torch_xla.distributed.parallel_loader as pl
    return pl.MpDeviceLoader(loader, d.device)


def xla_mean(value, d):
    """Mean over replicas of a device scalar: on TPU inside the step's graph (no host sync); XLA:CPU cuts the
    graph there (xla_reduce)."""
    value = value.clone()
    xla_reduce([value], "mean", XLA_CHANNELS["loss"])
    return value


def xla_report(fn, args):
    """Run fn(*args) after the step's graph has executed: no host sync inside the step."""
    import torch_xla.core.xla_model as xm
    xm.add_step_closure(fn, args=args)


def xla_save(state, path, d):
    """Every replica calls xm.save (it syncs); the master writes, then replaces atomically."""
    import torch_xla
    import torch_xla.core.xla_model as xm
    torch_xla.sync()  # run the pending step as the usual step graph (and its log closures) before the copy
    xm.save(state, path + ".tmp", global_master=True)
    if d.is_main:
        os.replace(path + ".tmp", path)
    xla_barrier()  # (xm.rendezvous("ckpt"), which XLA:CPU's replicas cannot pass: xla_reduce)


def xla_barrier():
    """Return once every replica has called this: a max over replicas of a scalar, read on the host."""
    import torch_xla
    token = torch.zeros((), device=torch_xla.device())
    xla_reduce([token], "max", XLA_CHANNELS["barrier"])
    token.item()


def xla_step_boundary():
    """Run the lazily traced graph now (torch_xla.sync). Called after every DDPM step of a variation grid,
    so that each step is one graph (compiled once, reused) instead of one graph of all sample_steps steps."""
    import torch_xla
    torch_xla.sync()


def xla_poll_stop(stop, step, cfg):
    """Replicas agree on stopping: each process (and each replica thread) may see the signal at another
    step. Every 10 steps, a max over replicas read on the host (a sync of that small graph only)."""
    if step % 10 and step != cfg.steps:
        return False
    import torch_xla
    flag = torch.tensor(float(bool(stop)), device=torch_xla.device())
    xla_reduce([flag], "max", XLA_CHANNELS["stop"])
    return flag.item() > 0
